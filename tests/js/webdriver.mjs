// A few W3C WebDriver calls over fetch, for driving Debian's chromium through chromedriver in
// the page tests (no client package). `open(args)` starts chromedriver, makes a session with
// those Chromium arguments, and returns the helpers.
import { spawn } from 'node:child_process';
import { writeFile } from 'node:fs/promises';

const ELEM = 'element-6066-11e4-a52e-4f735466cecf';
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns something truthy (errors count as "not yet"). */
export async function until(what, fn, ms = 30000) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    try { const v = await fn(); if (v) return v; } catch (e) { last = e; }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await sleep(100);
  }
}

export async function open(args, { shots = null, prefix = '' } = {}) {
  const port = 9600 + Math.floor(Math.random() * 2000);
  const driver = spawn('chromedriver', [`--port=${port}`], { stdio: 'ignore' });
  const wd = `http://127.0.0.1:${port}`;
  async function call(method, path, body) {
    const r = await fetch(wd + path, { method, headers: { 'Content-Type': 'application/json' }, body: body && JSON.stringify(body) });
    const j = await r.json();
    if (j.value && j.value.error) throw new Error(`${path}: ${j.value.message}`);
    return j.value;
  }
  for (let i = 0; ; i++) {
    try { await call('GET', '/status'); break; } catch { if (i > 100) throw new Error('no chromedriver'); await sleep(100); }
  }
  let sid;
  try {
    sid = (await call('POST', '/session', { capabilities: { alwaysMatch: {
      browserName: 'chrome', acceptInsecureCerts: false,
      'goog:chromeOptions': { args },
      'goog:loggingPrefs': { browser: 'ALL' },
    } } })).sessionId;
  } catch (e) {
    driver.kill();
    throw e;
  }
  const s = (p, b) => call('POST', `/session/${sid}${p}`, b);
  const g = (p) => call('GET', `/session/${sid}${p}`);
  const find = async (css) => {
    const v = await s('/element', { using: 'css selector', value: css });
    if (!v || !v[ELEM]) throw new Error(`find ${css}: ${JSON.stringify(v)}`);
    return v[ELEM];
  };
  return {
    s, g, find,
    findAll: async (css) => (await s('/elements', { using: 'css selector', value: css })).map((e) => e[ELEM]),
    click: async (css) => s(`/element/${await find(css)}/click`, {}),
    type: async (css, text) => s(`/element/${await find(css)}/value`, { text }),
    clear: async (css) => s(`/element/${await find(css)}/clear`, {}),
    text: async (css) => g(`/element/${await find(css)}/text`),
    js: (script, a = []) => s('/execute/sync', { script, args: a }),
    cdp: (cmd, params = {}) => s('/goog/cdp/execute', { cmd, params }),
    logs: () => s('/se/log', { type: 'browser' }),
    async shot(name) {
      if (!shots) return;
      await writeFile(`${shots}/${prefix}${name}.png`, Buffer.from(await g('/screenshot'), 'base64'));
    },
    async close() {
      await call('DELETE', `/session/${sid}`).catch(() => {});
      driver.kill();
    },
  };
}
