// The standard sockjs-client (from npm), restricted to one transport, driving the backend
// through HAProxy: sign up, create and open a workspace, execute `2+2`, wait for its output.
// Prints one JSON line with what happened; exits non-zero on any failure.
// Usage: node sockjs_client.js URL TRANSPORT ACCOUNT
'use strict';
const SockJS = require('sockjs-client');

const [url, transport, account] = process.argv.slice(2);
const sock = new SockJS(url, null, { transports: [transport] });
let nextId = 1;
const replies = new Map();
const outputs = new Map();

function call(msg) {
  return new Promise((resolve, reject) => {
    const id = nextId++;
    replies.set(id, (r) => (r.ok ? resolve(r) : reject(new Error(JSON.stringify(r)))));
    sock.send(JSON.stringify(Object.assign({ id }, msg)));
  });
}

function done(id) {
  return new Promise((resolve) => {
    const o = outputs.get(id) || { out: '' };
    o.resolve = resolve;
    outputs.set(id, o);
  });
}

sock.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.event) {
    const o = outputs.get(m.id) || { out: '' };
    outputs.set(m.id, o);
    if (m.event === 'stdout') o.out += m.data;
    if (m.event === 'done' && o.resolve) o.resolve({ status: m.status, out: o.out });
    if (m.event === 'done' && !o.resolve) o.early = { status: m.status, out: o.out };
    return;
  }
  const r = replies.get(m.id);
  if (r) {
    replies.delete(m.id);
    r(m);
  }
};

sock.onopen = async () => {
  try {
    await call({ op: 'signup', name: account, password: 'a long password' });
    const ws = (await call({ op: 'create', name: 'from sockjs-client' })).workspace;
    const opened = await call({ op: 'open', workspace: ws });
    const ex = await call({ op: 'execute', workspace: ws, code: '2+2' });
    const o = outputs.get(ex.id);
    const result = o && o.early ? o.early : await done(ex.id);
    console.log(JSON.stringify({ transport: sock.transport, worker: opened.worker, result }));
    sock.close();
    setTimeout(() => process.exit(0), 100);
  } catch (err) {
    console.error(String(err));
    process.exit(1);
  }
};

sock.onclose = (e) => {
  if (e.code !== 1000) {
    console.error(`closed: ${e.code} ${e.reason}`);
    process.exit(3);
  }
};

setTimeout(() => {
  console.error('timed out');
  process.exit(2);
}, 60000);
