// Unit tests of static/sagews.js on fake transports: node --test tests/js/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  SageWS, SageError, parseFrame, backoffDelay, randomIds, SAFE_OPS,
} from '../../static/sagews.js';
import { makeClient, openClient, tick } from './helpers.mjs';

test('frames: o, h, the streaming prelude, a[...], m, c[...], escaped unicode, garbage', () => {
  assert.deepEqual(parseFrame('o'), { type: 'open' });
  assert.deepEqual(parseFrame('h'), { type: 'heartbeat' });
  assert.deepEqual(parseFrame('h'.repeat(2048)), { type: 'heartbeat' });
  assert.deepEqual(parseFrame('a["x","{\\"id\\":1}"]'), { type: 'messages', messages: ['x', '{"id":1}'] });
  // The server escapes U+2028, U+200C, U+FFFx... as \uXXXX: JSON turns them back.
  const f = parseFrame(String.raw`a["x\ufffc\ufffd\u2028\u200cy\u00e9"]`);
  assert.deepEqual(f.messages, ['x\ufffc\ufffd\u2028\u200cyé']);
  assert.deepEqual(parseFrame('m"one"'), { type: 'messages', messages: ['one'] });
  assert.deepEqual(parseFrame('c[3001,"closed: this browser did not read its messages"]'),
    { type: 'close', code: 3001, reason: 'closed: this browser did not read its messages' });
  assert.deepEqual(parseFrame('c[2000,"backend full"]'), { type: 'close', code: 2000, reason: 'backend full' });
  assert.deepEqual(parseFrame('c[3000,"Go away!"]'), { type: 'close', code: 3000, reason: 'Go away!' });
  assert.throws(() => parseFrame('x'));
  assert.throws(() => parseFrame('a{"x":1}'));
  assert.throws(() => parseFrame('a["unterminated'));
});

test('ids: a 3-digit server id and a random session id', () => {
  const { server, session } = randomIds();
  assert.match(server, /^\d{3}$/);
  assert.match(session, /^[0-9a-f]{32}$/);
  assert.notEqual(randomIds().session, session);
});

test('requests are matched to their replies by id, also out of order', async () => {
  const { client, net } = await openClient();
  const a = client.ping();
  const b = client.list();
  const t = net.last();
  const [ra, rb] = t.requests();
  assert.deepEqual(ra, { id: 1, op: 'ping' });
  assert.deepEqual(rb, { id: 2, op: 'list' });
  t.msg({ id: 2, ok: true, workspaces: [] }, { id: 1, ok: true, pong: true });
  assert.deepEqual(await a, { id: 1, ok: true, pong: true });
  assert.deepEqual(await b, { id: 2, ok: true, workspaces: [] });
});

test('errors carry the server text, status and retry_after', async () => {
  const { client, net } = await openClient();
  const a = client.open('wnope');
  const b = client.signin('ada', 'wrong');
  net.last().msg(
    { id: 1, ok: false, error: 'no workspace "wnope" in your account', status: 404 },
    { id: 2, ok: false, error: 'too many failed sign-ins', status: 429, retry_after: 120 },
  );
  await assert.rejects(a, (e) => e instanceof SageError && e.message === 'no workspace "wnope" in your account'
    && e.status === 404 && e.retryAfter === null && e.op === 'open');
  await assert.rejects(b, (e) => e.status === 429 && e.retryAfter === 120 && e.message === 'too many failed sign-ins');
  assert.equal(client.openWorkspaces.size, 0);
});

test('a reply with id null answers the oldest request in flight', async () => {
  const { client, net } = await openClient();
  const big = client.write('w1', 'big.txt', 'x'.repeat(100));
  const next = client.ping();
  net.last().msg({ id: null, ok: false, error: 'message of 20000000 bytes refused' },
    { id: 2, ok: true, pong: true });
  await assert.rejects(big, /message of 20000000 bytes refused/);
  assert.equal((await next).pong, true);
});

test('requests made before the session opens wait and go in one batch, in order', async () => {
  const { client, net } = makeClient();
  const p = client.whoami(); // connects by itself
  const q = client.list();
  await tick();
  const t = net.last();
  assert.deepEqual(t.sent, []);
  t.frame('o');
  assert.deepEqual(t.requests().map((r) => r.op), ['whoami', 'list']);
  t.msg({ id: 1, ok: true, account: null }, { id: 2, ok: true, workspaces: [] });
  assert.equal((await p).account, null);
  await q;
});

test('events: an execute\'s events go to its callback; every event to its listeners', async () => {
  const { client, net } = await openClient();
  await openWs(client, net.last(), 'w1');
  const mine = [];
  const all = [];
  const offOut = client.on('stdout', (e) => all.push(e));
  client.on('done', (e) => all.push(e));
  const run = client.execute('w1', 'print(4)', (e) => mine.push(e.event));
  const t = net.last();
  const id = t.requests().at(-1).id;
  t.msg({ id, ok: true, workspace: 'w1' },
    { event: 'stdout', workspace: 'w1', id, data: '4\n' },
    { event: 'stdout', workspace: 'w1', id: 999, data: 'another tab\n' },
    { event: 'image', workspace: 'w1', id, mime: 'image/png', data: 'AAAA' },
    { event: 'truncated', workspace: 'w1', id, message: 'output truncated' },
    { event: 'done', workspace: 'w1', id, status: 'ok', message: null });
  await run;
  assert.deepEqual(mine, ['stdout', 'image', 'truncated', 'done']);
  assert.deepEqual(all.map((e) => e.id), [id, 999, id]);
  offOut();
  t.msg({ event: 'stdout', workspace: 'w1', id: 5, data: 'x' });
  assert.equal(all.length, 3);
  // A later event with the same id does not reach the finished execute.
  t.msg({ event: 'stdout', workspace: 'w1', id, data: 'late' });
  assert.equal(mine.length, 4);
});

test('a "closed" event for a deleted workspace forgets it; others keep it open', async () => {
  const { client, net } = await openClient();
  await openWs(client, net.last(), 'w1');
  net.last().msg({ event: 'closed', workspace: 'w1', reason: 'idle', message: 'the session ended' });
  assert.ok(client.openWorkspaces.has('w1'));
  net.last().msg({ event: 'closed', workspace: 'w1', reason: 'deleted' });
  assert.ok(!client.openWorkspaces.has('w1'));
});

async function openWs(client, t, ws) {
  const p = client.open(ws);
  const id = t.requests().at(-1).id;
  t.msg({ id, ok: true, workspace: ws, name: ws, worker: 'worker1' });
  await p;
}

test('reconnect: backoff with jitter, the open workspaces opened again, the page told', async () => {
  const { client, net, clock, events } = await openClient({ backoff: { base: 1000, max: 8000 } });
  await openWs(client, net.last(), 'w1');
  await openWs(client, net.last(), 'w2');
  net.last().end({ error: 'network' });
  const disc = events.find(([n]) => n === 'disconnected');
  assert.equal(disc[1].error, 'network');
  assert.equal(client.state, 'reconnecting');
  // First delay: between base/2 and base (random 0.5 → 750).
  assert.deepEqual(clock.pending(), [750]);
  // The next attempts fail before opening: the delay doubles, up to the cap.
  const delays = [];
  for (let i = 0; i < 5; i++) {
    const before = net.made.length;
    await clock.advance(clock.pending()[0]);
    // Every transport is tried before waiting again.
    while (client.state === 'connecting') net.last().end({ error: 'refused' });
    assert.equal(net.made.length - before, 3);
    delays.push(...clock.pending().filter((ms) => ms !== 10000)); // not the open timeout
  }
  assert.deepEqual(delays, [1500, 3000, 6000, 6000, 6000]);
  await clock.advance(6000);
  const t = net.last();
  t.frame('o');
  const opens = t.requests();
  assert.deepEqual(opens.map((r) => [r.op, r.workspace]).sort(), [['open', 'w1'], ['open', 'w2']]);
  t.msg(...opens.map((r) => ({ id: r.id, ok: true, workspace: r.workspace, name: 'x', worker: 'worker2' })));
  await tick();
  const resumed = events.find(([n]) => n === 'resumed');
  assert.deepEqual(resumed[1].workspaces.sort(), ['w1', 'w2']);
  assert.deepEqual(resumed[1].failed, []);
  const states = events.filter(([n]) => n === 'state').map(([, v]) => v.state);
  assert.deepEqual(states.slice(0, 4), ['connecting', 'open', 'reconnecting', 'connecting']);
  assert.equal(states.at(-1), 'open');
});

test('backoff: grows, capped, jittered', () => {
  assert.equal(backoffDelay(0, { base: 500, max: 30000 }, () => 0), 250);
  assert.equal(backoffDelay(0, { base: 500, max: 30000 }, () => 1), 500);
  assert.equal(backoffDelay(3, { base: 500, max: 30000 }, () => 1), 4000);
  assert.equal(backoffDelay(20, { base: 500, max: 30000 }, () => 1), 30000);
  assert.equal(backoffDelay(20, { base: 500, max: 30000 }, () => 0), 15000);
});

test('a workspace that cannot be opened again is reported and forgotten', async () => {
  const { client, net, clock, events } = await openClient();
  await openWs(client, net.last(), 'w1');
  net.last().end();
  await clock.advance(1000);
  const t = net.last();
  t.frame('o');
  t.msg({ id: t.requests()[0].id, ok: false, error: 'no workspace "w1" in your account', status: 404 });
  await tick();
  const [, r] = events.find(([n]) => n === 'resumed');
  assert.deepEqual(r.workspaces, []);
  assert.equal(r.failed[0].workspace, 'w1');
  assert.equal(r.failed[0].error.status, 404);
  assert.equal(client.openWorkspaces.size, 0);
});

test('a dropped connection: reads are sent again, other requests reject, executes are lost', async () => {
  const { client, net, clock, events } = await openClient();
  await openWs(client, net.last(), 'w1');
  const seen = [];
  const run = client.execute('w1', 'sleep(100)', (e) => seen.push(e));
  const save = client.save('w1', 'x');
  const hist = client.history('w1');
  const t1 = net.last();
  const runId = t1.requests().at(-3).id;
  t1.msg({ id: runId, ok: true, workspace: 'w1' });
  await run;
  t1.end({ error: 'network' });
  await assert.rejects(save, (e) => e.code === 'connection_lost' && /"save"/.test(e.message) && /may or may not/.test(e.message));
  assert.equal(seen.at(-1).event, 'lost');
  assert.equal(seen.at(-1).id, runId);
  assert.ok(events.some(([n, v]) => n === 'lost' && v.workspace === 'w1'));
  await clock.advance(1000);
  const t2 = net.last();
  t2.frame('o');
  const ops = t2.requests().map((r) => r.op);
  assert.deepEqual(ops, ['open', 'history']); // the workspace first, then the read
  const h = t2.requests()[1];
  t2.msg({ id: t2.requests()[0].id, ok: true, workspace: 'w1', name: 'n', worker: 'w' },
    { id: h.id, ok: true, workspace: 'w1', history: [] });
  assert.deepEqual((await hist).history, []);
  assert.ok(SAFE_OPS.has('read') && !SAFE_OPS.has('write') && !SAFE_OPS.has('execute'));
});

test('transports: websocket, then xhr-streaming, then xhr-polling when each fails to open', async () => {
  const { client, net } = makeClient();
  client.connect();
  await tick();
  assert.deepEqual(net.made.map((t) => t.kind), ['websocket']);
  assert.match(net.last().ctx.wsUrl, /^wss:\/\/sage\.test\/sockjs\/\d{3}\/[a-z0-9]+$/);
  net.last().end({ error: 'blocked' });
  assert.equal(net.last().kind, 'xhr-streaming');
  assert.match(net.last().ctx.url, /^https:\/\/sage\.test\/sockjs\/\d{3}\/[a-z0-9]+$/);
  net.last().end({ error: 'blocked' });
  assert.equal(net.last().kind, 'xhr-polling');
  net.last().frame('o');
  assert.equal(client.state, 'open');
  assert.equal(client.transport, 'xhr-polling');
});

test('a transport that never answers is given up after openTimeout', async () => {
  const { client, net, clock } = makeClient({ openTimeout: 5000 });
  client.connect();
  await tick();
  await clock.advance(4999);
  assert.equal(net.made.length, 1);
  await clock.advance(1);
  assert.ok(net.made[0].closed);
  assert.equal(net.last().kind, 'xhr-streaming');
});

test('forcing a transport uses only that one; a working transport is kept for reconnects', async () => {
  const { client, net, clock } = makeClient({ transport: 'xhr-polling' });
  client.connect();
  await tick();
  assert.deepEqual(net.made.map((t) => t.kind), ['xhr-polling']);
  net.last().end();
  assert.equal(net.made.length, 1); // no other transport: wait and retry
  await clock.advance(1000);
  assert.deepEqual(net.made.map((t) => t.kind), ['xhr-polling', 'xhr-polling']);

  const b = makeClient();
  b.client.connect();
  await tick();
  b.net.last().end();
  b.net.last().frame('o'); // xhr-streaming works
  b.net.last().end();
  await b.clock.advance(1000);
  assert.deepEqual(b.net.made.map((t) => t.kind), ['websocket', 'xhr-streaming', 'xhr-streaming']);
});

test('/info: websocket false skips the websocket; an unreachable server is retried', async () => {
  const calls = [];
  let fail = true;
  const fetch = async (url) => {
    calls.push(url);
    if (fail) throw new Error('connection refused');
    return new Response(JSON.stringify({ websocket: false, cookie_needed: false, origins: ['*:*'], entropy: 1 }));
  };
  const { client, net, clock, events } = makeClient({ info: true, fetch });
  client.connect();
  await tick();
  assert.deepEqual(calls, ['https://sage.test/sockjs/info']);
  assert.equal(net.made.length, 0);
  assert.equal(client.state, 'reconnecting');
  assert.match(events.find(([n, v]) => n === 'state' && v.state === 'reconnecting')[1].error, /connection refused/);
  fail = false;
  await clock.advance(1000);
  assert.deepEqual(net.made.map((t) => t.kind), ['xhr-streaming']);
});

test('heartbeats: no frame for the timeout means a dead connection', async () => {
  const { client, net, clock, events } = await openClient({ heartbeatTimeout: 55000 });
  await clock.advance(30000);
  net.last().frame('h');
  await clock.advance(54000);
  assert.equal(client.state, 'open');
  await clock.advance(1000);
  assert.ok(net.made[0].closed);
  const [, d] = events.find(([n]) => n === 'disconnected');
  assert.match(d.error, /no heartbeat/);
  assert.equal(client.state, 'reconnecting');
  await clock.advance(1000);
  assert.equal(net.made.length, 2);
});

test('close frames: 3001 and 3000 reconnect; 2000 before open waits; 2010 retries at once', async () => {
  const { client, net, clock, events } = await openClient();
  net.last().frame('c[3001,"closed: this browser did not read its messages (9000000 bytes waiting); reconnect"]');
  assert.ok(net.last().closed);
  const [, d] = events.find(([n]) => n === 'disconnected');
  assert.equal(d.code, 3001);
  assert.match(d.reason, /did not read/);
  await clock.advance(1000);
  assert.equal(net.made.length, 2);
  // Refused before opening: not the transport's fault, so no fallback, a wait instead.
  net.last().frame('c[2000,"this backend is full (10000 sessions); try again shortly"]');
  assert.equal(net.made.length, 2);
  assert.equal(client.state, 'reconnecting');
  await clock.advance(2000);
  assert.equal(net.made.length, 3);
  assert.equal(net.last().kind, 'websocket');
  net.last().frame('o');
  net.last().frame('c[2010,"Another connection still open"]');
  assert.deepEqual(clock.pending().filter((ms) => ms === 0), [0]);
  await clock.advance(0);
  assert.equal(net.made.length, 4);
  net.last().frame('o');
  net.last().frame('c[3000,"Go away!"]');
  assert.equal(client.state, 'reconnecting');
});

test('a restarting backend: what it refused is sent again after reconnecting at once; a running execute ends there', async () => {
  const { client, net, clock, events } = await openClient();
  await openWs(client, net.last(), 'w1');
  const outputs = [];
  const first = client.execute('w1', 'print(1)', (ev) => outputs.push(['first', ev.event]));
  const t = net.last();
  const firstId = t.requests().at(-1).id;
  t.msg({ id: firstId, ok: true, workspace: 'w1' });
  await first;
  // The server stops: the next execute and a save are refused as restarting (nothing done).
  const second = client.execute('w1', 'print(2)', (ev) => outputs.push(['second', ev.event]));
  const save = client.save('w1', 'before the restart');
  const [, secondReq, saveReq] = t.requests().slice(-3);
  assert.equal(secondReq.op, 'execute');
  assert.equal(saveReq.op, 'save');
  t.msg({ event: 'done', workspace: 'w1', id: firstId, status: 'ok' },
    { id: secondReq.id, ok: false, code: 'restarting', status: 503, error: 'this server is restarting' },
    { id: saveReq.id, ok: false, code: 'restarting', status: 503, error: 'this server is restarting' });
  await tick();
  assert.deepEqual(outputs, [['first', 'done']]);
  t.frame('c[1012,"the server is restarting: reconnect"]');
  assert.ok(!events.some(([n]) => n === 'lost'), 'the refused execute did not run: not lost');
  assert.deepEqual(clock.pending().filter((ms) => ms === 0), [0], 'reconnects at once');
  await clock.advance(0);
  const u = net.last();
  assert.notEqual(u, t);
  u.frame('o');
  // The workspace is opened again first, then the refused requests, in their order, same ids.
  const again = u.requests();
  assert.deepEqual(again.map((r) => r.op), ['open', 'execute', 'save']);
  assert.deepEqual([again[1].id, again[2].id], [secondReq.id, saveReq.id]);
  u.msg({ id: again[0].id, ok: true, workspace: 'w1', name: 'w1', worker: 'worker2' },
    { id: secondReq.id, ok: true, workspace: 'w1' },
    { event: 'done', workspace: 'w1', id: secondReq.id, status: 'ok' },
    { id: saveReq.id, ok: true, workspace: 'w1', changed: true });
  await second;
  assert.equal((await save).changed, true);
  assert.deepEqual(outputs, [['first', 'done'], ['second', 'done']]);
});

test('a second "o" means the server lost the session: start again', async () => {
  const { client, net, clock, events } = await openClient();
  await openWs(client, net.last(), 'w1');
  net.last().frame('o');
  assert.ok(events.some(([n]) => n === 'disconnected'));
  await clock.advance(0);
  net.last().frame('o');
  assert.equal(net.last().requests()[0].op, 'open');
  assert.equal(client.state, 'open');
});

test('a broken frame or message is reported; a broken frame drops the connection', async () => {
  const { client, net, events } = await openClient();
  net.last().frame('a["not json"]');
  assert.ok(events.some(([n]) => n === 'protocol_error'));
  assert.equal(client.state, 'open');
  net.last().frame('zzz');
  assert.equal(client.state, 'reconnecting');
});

test('close() rejects what waits and does not reconnect; requests after it fail', async () => {
  const { client, net, clock } = await openClient();
  const p = client.list();
  client.close();
  await assert.rejects(p, (e) => e.code === 'closed');
  await clock.advance(60000);
  assert.equal(net.made.length, 1);
  await assert.rejects(client.ping(), (e) => e.code === 'closed');
  client.connect();
  await tick();
  assert.equal(net.made.length, 2);
});

test('reconnect() starts a fresh session at once (after a cookie sign-in)', async () => {
  const { client, net, clock } = await openClient();
  const done = client.reconnect();
  await clock.advance(0);
  assert.equal(net.made.length, 2);
  net.last().frame('o');
  await done;
  assert.equal(client.state, 'open');
});

test('a request with a timeout rejects when nothing answers', async () => {
  const { client, clock } = await openClient();
  const p = assert.rejects(client.request('ping', {}, { timeout: 3000 }), (e) => e.code === 'timeout');
  await clock.advance(3000);
  await p;
});

test('SageWS exports a default and works without options in a page-like global', () => {
  assert.equal(typeof SageWS, 'function');
  const c = new SageWS({ url: 'https://x.test/', watchOnline: false });
  assert.equal(c.base, 'https://x.test');
  assert.equal(c.rest.bundleUrl('w1'), 'https://x.test/api/workspaces/w1/bundle');
});

test('after a reconnect, the workspaces are opened before anything the page sends on "open"', async () => {
  const { client, net, clock } = await openClient();
  await openWs(client, net.last(), 'w1');
  client.on('open', () => { client.execute('w1', 'x', () => {}); });
  net.last().end();
  client.save('w1', 'asked for while the connection was down');
  await clock.advance(1000);
  net.last().frame('o');
  // The save was queued before the reconnect; the execute waits for the workspace's reopen.
  assert.deepEqual(net.last().requests().map((r) => r.op), ['open', 'save']);
  const open = net.last().requests()[0];
  net.last().msg({ id: open.id, ok: true, workspace: 'w1', name: 'w1', worker: 'worker1' });
  for (let i = 0; i < 5; i++) await Promise.resolve();
  assert.deepEqual(net.last().requests().map((r) => r.op), ['open', 'save', 'execute']);
});

test('a reopen refused with 503 (the backend has no worker yet) is tried again', async () => {
  const { client, net, clock, events } = await openClient();
  await openWs(client, net.last(), 'w1');
  net.last().end();
  await clock.advance(1000);
  net.last().frame('o');
  const first = net.last().requests().at(-1);
  assert.equal(first.op, 'open');
  const ran = client.execute('w1', '1+1', () => {});
  net.last().msg({ id: first.id, ok: false, error: 'no worker is available; try again shortly', status: 503 });
  for (let i = 0; i < 5; i++) await Promise.resolve();
  assert.equal(net.last().requests().filter((r) => r.op === 'open').length, 1, 'not at once');
  await clock.advance(600);
  const again = net.last().requests().at(-1);
  assert.equal(again.op, 'open', 'tried again after a wait');
  net.last().msg({ id: again.id, ok: true, workspace: 'w1', name: 'w1', worker: 'worker2' });
  for (let i = 0; i < 5; i++) await Promise.resolve();
  const exec = net.last().requests().at(-1);
  assert.equal(exec.op, 'execute', 'the execute went after the reopen');
  net.last().msg({ id: exec.id, ok: true, workspace: 'w1' });
  await ran;
  assert.ok(events.some(([n, e]) => n === 'resumed' && e.workspaces.includes('w1')));
});

test('close() while /info is being asked stops that attempt', async () => {
  let answer;
  const fetch = () => new Promise((r) => { answer = r; });
  const { client, net } = makeClient({ info: true, fetch });
  client.connect();
  await tick();
  client.close();
  answer(new Response('{"websocket":true}'));
  await tick();
  assert.equal(net.made.length, 0);
  assert.equal(client.state, 'closed');
});
