// The real transports of static/sagews.js against a fake WebSocket and a fake fetch, and the
// REST helpers.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SageWS, SageREST } from '../../static/sagews.js';
import { tick } from './helpers.mjs';

class FakeWebSocket {
  static made = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = false;
    FakeWebSocket.made.push(this);
  }
  send(text) { this.sent.push(text); }
  close() { this.closed = true; }
  serve(data) { this.onmessage({ data }); }
  drop(code = 1006) { this.onclose({ code }); }
}

/** A fetch that records requests and answers from a handler(url, init) → Response. */
function fakeFetch(handler) {
  const calls = [];
  const f = async (url, init = {}) => {
    calls.push({ url, init });
    return handler(url, init, calls);
  };
  f.calls = calls;
  return f;
}

/** A streamed response whose chunks the test pushes. */
function stream() {
  let ctl;
  const body = new ReadableStream({ start(c) { ctl = c; } });
  const enc = new TextEncoder();
  return {
    response: new Response(body),
    push(s) { ctl.enqueue(enc.encode(s)); },
    end() { ctl.close(); },
  };
}

function client(opts) {
  return new SageWS({ url: 'https://sage.test', info: false, watchOnline: false, random: () => 0.25, ...opts });
}

test('websocket: wss URL, frames in, JSON arrays out, a drop before "o" falls back', async () => {
  FakeWebSocket.made = [];
  const fetch = fakeFetch(() => new Promise(() => {})); // xhr-streaming never answers
  const c = client({ WebSocket: FakeWebSocket, fetch });
  const msgs = [];
  c.on('stdout', (e) => msgs.push(e.data));
  c.connect();
  await tick();
  const ws = FakeWebSocket.made[0];
  assert.match(ws.url, /^wss:\/\/sage\.test\/sockjs\/\d{3}\/[0-9a-f]{32}\/websocket$/);
  ws.serve('o');
  assert.equal(c.state, 'open');
  const p = c.ping();
  assert.deepEqual(ws.sent, ['["{\\"id\\":1,\\"op\\":\\"ping\\"}"]']);
  ws.serve('a["{\\"id\\":1,\\"ok\\":true,\\"pong\\":true}","{\\"event\\":\\"stdout\\",\\"workspace\\":\\"w\\",\\"id\\":7,\\"data\\":\\"\\u2028\\"}"]');
  assert.equal((await p).pong, true);
  assert.deepEqual(msgs, ['\u2028']);
  c.close();
  assert.ok(ws.closed);

  // Blocked websockets: closed before opening → xhr-streaming.
  const d = client({ WebSocket: FakeWebSocket, fetch });
  d.connect();
  await tick();
  FakeWebSocket.made.at(-1).drop();
  await tick();
  assert.match(fetch.calls.at(-1).url, /^https:\/\/sage\.test\/sockjs\/\d{3}\/[0-9a-f]{32}\/xhr_streaming$/);
  assert.equal(fetch.calls.at(-1).init.method, 'POST');
  d.close();
});

test('xhr-streaming: the prelude, frames split across chunks, sends by xhr_send, a new request when one ends', async () => {
  const streams = [];
  const fetch = fakeFetch((url) => {
    if (url.endsWith('/xhr_streaming')) {
      const s = stream();
      streams.push(s);
      return s.response;
    }
    if (url.endsWith('/xhr_send')) return new Response(null, { status: 204 });
    return new Response('', { status: 404 });
  });
  const c = client({ transport: 'xhr-streaming', fetch });
  const events = [];
  c.on('stdout', (e) => events.push(e.data));
  c.connect();
  await tick();
  streams[0].push(`${'h'.repeat(2048)}\no\n`);
  await tick();
  assert.equal(c.state, 'open');
  const p = c.list();
  const q = c.ping();
  await tick();
  const sends = fetch.calls.filter((x) => x.url.endsWith('/xhr_send'));
  // The first goes at once; the second waits for it, then goes alone.
  assert.deepEqual(sends.map((x) => JSON.parse(x.init.body)),
    [['{"id":1,"op":"list"}'], ['{"id":2,"op":"ping"}']]);
  const base = sends[0].url.slice(0, -'/xhr_send'.length);
  assert.equal(fetch.calls[0].url, `${base}/xhr_streaming`);
  streams[0].push('a["{\\"id\\":1,\\"ok\\":true,');
  streams[0].push('\\"workspaces\\":[]}"]\nh\na["{\\"id\\":2,\\"ok\\":true,\\"pong\\":true}"]\n');
  assert.deepEqual((await p).workspaces, []);
  assert.equal((await q).pong, true);
  // The server ends a response after 128 KiB: the client asks again on the same session.
  streams[0].end();
  await tick();
  await tick();
  assert.equal(streams.length, 2);
  assert.equal(fetch.calls.filter((x) => x.url.endsWith('/xhr_streaming')).at(-1).url, `${base}/xhr_streaming`);
  streams[1].push(`${'h'.repeat(2048)}\na["{\\"event\\":\\"stdout\\",\\"workspace\\":\\"w\\",\\"id\\":3,\\"data\\":\\"hi\\"}"]\n`);
  await tick();
  assert.deepEqual(events, ['hi']);
  assert.equal(c.state, 'open');
  // A close frame ends it; the client reconnects on a new session.
  streams[1].push('c[3000,"Go away!"]\n');
  await tick();
  assert.equal(c.state, 'reconnecting');
  c.close();
});

test('xhr-polling: one request per frame, sends by xhr_send, a failed send drops the connection', async () => {
  const answers = ['o\n', 'a["{\\"id\\":1,\\"ok\\":true,\\"account\\":\\"ada\\"}"]\n'];
  let sendStatus = 204;
  const fetch = fakeFetch((url) => {
    if (url.endsWith('/xhr')) {
      const a = answers.shift();
      return a === undefined ? new Promise(() => {}) : new Response(a);
    }
    if (url.endsWith('/xhr_send')) return new Response(null, { status: sendStatus });
    return new Response('', { status: 404 });
  });
  const c = client({ transport: 'xhr-polling', fetch });
  const p = c.whoami();
  await tick();
  await tick();
  assert.equal(c.state, 'open');
  await tick();
  assert.equal((await p).account, 'ada');
  const polls = fetch.calls.filter((x) => x.url.endsWith('/xhr'));
  assert.equal(polls.length, 3);
  assert.equal(new Set(polls.map((x) => x.url)).size, 1);
  const sends = fetch.calls.filter((x) => x.url.endsWith('/xhr_send'));
  assert.deepEqual(JSON.parse(sends[0].init.body), ['{"id":1,"op":"whoami"}']);
  sendStatus = 404;
  const lost = c.save('w', 'm');
  await assert.rejects(lost, (e) => e.code === 'connection_lost');
  assert.equal(c.state, 'reconnecting');
  c.close();
});

test('REST: sign-in and sign-up post JSON; errors carry status and Retry-After', async () => {
  const fetch = fakeFetch((url, init) => {
    if (url.endsWith('/api/signin')) {
      const body = JSON.parse(init.body);
      if (body.password === 'wrong') {
        return new Response(JSON.stringify({ ok: false, error: 'too many failed sign-ins' }),
          { status: 429, headers: { 'Retry-After': '30', 'Content-Type': 'application/json' } });
      }
      return new Response(JSON.stringify({ ok: true, account: body.name }));
    }
    if (url.endsWith('/api/signup')) {
      return new Response(JSON.stringify({ ok: false, error: 'that name is taken' }), { status: 409 });
    }
    if (url.endsWith('/api/whoami')) {
      return new Response(JSON.stringify({ ok: false, error: 'sign in first (no session cookie)' }), { status: 401 });
    }
    if (url.endsWith('/api/signout')) return new Response(JSON.stringify({ ok: true }));
    return new Response('Not found\n', { status: 404 });
  });
  const rest = new SageREST({ url: 'https://sage.test', fetch });
  assert.deepEqual(await rest.signin('ada', 'pw'), { ok: true, account: 'ada' });
  const call = fetch.calls[0];
  assert.equal(call.url, 'https://sage.test/api/signin');
  assert.equal(call.init.method, 'POST');
  assert.equal(call.init.credentials, 'same-origin');
  assert.equal(call.init.headers['Content-Type'], 'application/json');
  assert.deepEqual(JSON.parse(call.init.body), { name: 'ada', password: 'pw' });
  await assert.rejects(rest.signin('ada', 'wrong'),
    (e) => e.status === 429 && e.retryAfter === 30 && e.message === 'too many failed sign-ins');
  await assert.rejects(rest.signup('ada', 'pw'), (e) => e.status === 409 && e.message === 'that name is taken');
  assert.equal(await rest.whoami(), null);
  assert.deepEqual(await rest.signout(), { ok: true });
  await assert.rejects(rest.download('w1'), (e) => e.status === 404);
});

test('REST: a bundle upload creates a workspace; the download URL', async () => {
  const fetch = fakeFetch((url, init) => new Response(JSON.stringify({ ok: true, workspace: 'w123', size: init.body.size }),
    { status: 201 }));
  const rest = new SageREST({ url: 'https://sage.test', fetch });
  const blob = new Blob([new Uint8Array([1, 2, 3])]);
  const r = await rest.upload('My notes & more', blob);
  assert.equal(r.workspace, 'w123');
  assert.equal(fetch.calls[0].url, 'https://sage.test/api/workspaces?name=My%20notes%20%26%20more');
  assert.equal(fetch.calls[0].init.headers['Content-Type'], 'application/octet-stream');
  assert.equal(fetch.calls[0].init.body, blob);
  assert.equal(rest.bundleUrl('w123'), 'https://sage.test/api/workspaces/w123/bundle');
  const err = new SageREST({ fetch: async () => { throw new TypeError('Failed to fetch'); } });
  await assert.rejects(err.whoami(), (e) => e.code === 'network' && /cannot reach/.test(e.message));
});
