// The golden file tests/js/messages.json: every request op, reply shape and event, exactly as
// the server speaks them. The library must send each request (byte for byte the same JSON
// object) and handle each reply and event. The Rust side tests its own types on the same file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { OPS, SERVER_EVENTS, SageError } from '../../static/sagews.js';
import { openClient } from './helpers.mjs';

const golden = JSON.parse(readFileSync(new URL('./messages.json', import.meta.url), 'utf8'));

// How the page asks for each op, through the library's own methods.
const calls = {
  ping: (c) => c.ping(),
  whoami: (c) => c.whoami(),
  signup: (c, m) => c.signup(m.name, m.password),
  signin: (c, m) => c.signin(m.name, m.password),
  signout: (c) => c.signout(),
  list: (c) => c.list(),
  create: (c, m) => c.create(m.name),
  rename: (c, m) => c.rename(m.workspace, m.name),
  delete: (c, m) => c.delete(m.workspace),
  open: (c, m) => c.open(m.workspace),
  close: (c, m) => c.closeWorkspace(m.workspace),
  execute: (c, m) => c.execute(m.workspace, m.code, () => {}),
  interrupt: (c, m) => c.interrupt(m.workspace),
  save: (c, m) => c.save(m.workspace, m.message),
  history: (c, m) => c.history(m.workspace),
  revert: (c, m) => c.revert(m.workspace, m.commit),
  publish: (c, m) => c.publish(m.workspace, m.path),
  files: (c, m) => c.files(m.workspace),
  read: (c, m) => c.read(m.workspace, m.path),
  write: (c, m) => c.write(m.workspace, m.path, m.data),
  remove: (c, m) => c.remove(m.workspace, m.path),
  fleet: (c) => c.fleet(),
  drain_worker: (c, m) => c.drainWorker(m.worker, m.drain),
};

test('the golden file covers every op and every event, and only those', () => {
  assert.deepEqual(Object.keys(golden.requests).sort(), [...OPS].sort());
  assert.deepEqual(Object.keys(calls).sort(), [...OPS].sort());
  for (const op of OPS) assert.ok(golden.replies[op], `a reply for ${op}`);
  assert.deepEqual(Object.keys(golden.events).sort(), [...SERVER_EVENTS].sort());
  for (const [op, m] of Object.entries(golden.requests)) {
    assert.equal(m.op, op);
    assert.equal(golden.replies[op].id, m.id, `the ${op} reply answers its request`);
    assert.equal(golden.replies[op].ok, true);
  }
  for (const [name, e] of Object.entries(golden.events)) assert.equal(e.event, name);
});

test('the library sends every request op exactly as the golden file has it', async () => {
  for (const [op, m] of Object.entries(golden.requests)) {
    const { client, net } = await openClient();
    client.nextId = m.id;
    const p = calls[op](client, m);
    const sent = net.last().sent;
    assert.equal(sent.length, 1, op);
    assert.deepEqual(JSON.parse(sent[0]), m, op);
    net.last().msg(golden.replies[op]);
    assert.deepEqual(await p, golden.replies[op], op);
  }
});

test('every reply shape is handled: success resolves with it, errors reject with their fields', async () => {
  const { client, net } = await openClient();
  const t = net.last();
  // Successes, all in one frame, matched by id.
  const waiting = Object.entries(golden.requests).map(([op, m]) => {
    client.nextId = m.id;
    return [op, calls[op](client, m)];
  });
  t.msg(...OPS.map((op) => golden.replies[op]));
  for (const [op, p] of waiting) assert.deepEqual(await p, golden.replies[op]);
  // The open reply recorded the workspace; the close, delete and signout ones forgot it again.
  assert.equal(client.openWorkspaces.size, 0);

  const e = golden.replies.error;
  client.nextId = e.id;
  const p1 = client.open('wnope');
  t.msg(e);
  await assert.rejects(p1, (x) => x instanceof SageError && x.message === e.error && x.status === e.status
    && x.retryAfter === null && JSON.stringify(x.reply) === JSON.stringify(e));

  const r = golden.replies.rate_limited;
  client.nextId = r.id;
  const p2 = client.signin('ada', 'nope');
  t.msg(r);
  await assert.rejects(p2, (x) => x.message === r.error && x.status === 429 && x.retryAfter === r.retry_after);

  const u = golden.replies.unparseable;
  const p3 = client.write('w0123456789abcde', 'big', 'x');
  t.msg(u);
  await assert.rejects(p3, (x) => x.message === u.error);
});

test('every event reaches its listeners as it is; an execute\'s events reach its callback', async () => {
  const { client, net } = await openClient();
  const t = net.last();
  const got = {};
  for (const name of SERVER_EVENTS) client.on(name, (e) => { got[name] = e; });
  const run = golden.requests.execute;
  client.nextId = run.id;
  const mine = [];
  const p = client.execute(run.workspace, run.code, (e) => mine.push(e.event));
  t.msg(golden.replies.execute);
  await p;
  const order = ['stdout', 'stderr', 'image', 'truncated', 'moved', 'worker_lost', 'reopened', 'error', 'done', 'closed'];
  assert.deepEqual([...order].sort(), [...SERVER_EVENTS].sort());
  t.msg(...order.map((n) => golden.events[n]));
  for (const name of SERVER_EVENTS) assert.deepEqual(got[name], golden.events[name], name);
  assert.deepEqual(mine, ['stdout', 'stderr', 'image', 'truncated', 'done']);
});
