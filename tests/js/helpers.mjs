// Test doubles for static/sagews.js: a clock, fake transports, a fake WebSocket and fetch.
import { SageWS } from '../../static/sagews.js';

export const tick = () => new Promise((r) => setImmediate(r));

/** Timers that run only when the test advances time. */
export class Clock {
  constructor() {
    this.t = 0;
    this.n = 0;
    this.timers = new Map();
    this.setTimeout = (fn, ms = 0) => {
      const id = ++this.n;
      this.timers.set(id, { at: this.t + ms, fn, ms });
      return id;
    };
    this.clearTimeout = (id) => { this.timers.delete(id); };
    this.now = () => this.t;
  }
  /** Runs every timer due within `ms`, in order, letting promises settle between them. */
  async advance(ms) {
    const end = this.t + ms;
    for (;;) {
      await tick();
      let next = null;
      for (const [id, tm] of this.timers) if (tm.at <= end && (!next || tm.at < next[1].at)) next = [id, tm];
      if (!next) break;
      this.timers.delete(next[0]);
      this.t = next[1].at;
      next[1].fn();
    }
    this.t = end;
    await tick();
  }
  /** The delays (ms) of the timers now waiting. */
  pending() { return [...this.timers.values()].map((t) => t.ms); }
}

/** Fake transports: each one made is recorded; the test plays the server through it. */
export function fakeNet() {
  const made = [];
  const mk = (kind) => (ctx) => {
    const t = {
      kind, ctx, sent: [], closed: false,
      send(msgs) { if (this.closed) throw new Error('closed'); this.sent.push(...msgs); },
      close() { this.closed = true; },
      frame(f) { ctx.onframe(f); },
      end(info = { error: 'gone' }) { this.closed = true; ctx.onclose(info); },
      /** The requests sent, parsed. */
      requests() { return this.sent.map((s) => JSON.parse(s)); },
      /** Sends the server's messages in one "a" frame. */
      msg(...objs) { ctx.onframe(`a${JSON.stringify(objs.map((o) => JSON.stringify(o)))}`); },
    };
    made.push(t);
    return t;
  };
  return {
    made,
    last: () => made[made.length - 1],
    transports: { websocket: mk('websocket'), 'xhr-streaming': mk('xhr-streaming'), 'xhr-polling': mk('xhr-polling') },
  };
}

/** A client on fake transports and a fake clock (no /info request unless `info` is given). */
export function makeClient(opts = {}) {
  const clock = new Clock();
  const net = fakeNet();
  const client = new SageWS({
    url: 'https://sage.test', info: false, transports: net.transports,
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now,
    random: () => 0.5, watchOnline: false, ...opts,
  });
  const events = [];
  for (const n of ['state', 'disconnected', 'resumed', 'lost', 'protocol_error']) {
    client.on(n, (v) => events.push([n, v]));
  }
  return { client, clock, net, events };
}

/** A client whose first transport has opened. */
export async function openClient(opts) {
  const c = makeClient(opts);
  c.client.connect();
  await tick();
  c.net.last().frame('o');
  return c;
}
