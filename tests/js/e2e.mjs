// One person's whole session in a real headless Chromium (chromedriver, plain WebDriver calls)
// against a real deployment: sign up, create, run, stream, interrupt, files, save, revert,
// publish, a plot, sign out and in. tests/e2e.rs deploys lab machines with `sagectl up` and runs
// this, several at once. The browser trusts the deployment's CA from the NSS database under
// $HOME (never by ignoring certificate errors) and resolves the public name to the lab's
// HAProxy (--host-resolver-rules). Environment:
//   SAGEWS_URL        https://<public name>/
//   SAGEWS_ADDRESS    the loadbalancer's address
//   SAGEWS_CA         the deployment's CA file (for fetching the published file from node)
//   SAGEWS_USER       the account to make
//   SAGEWS_TRANSPORT  websocket | xhr-streaming | xhr-polling (forced)
//   SAGEWS_PHONE      1: a 375x800 phone viewport
//   SAGEWS_SHOTS      a directory for screenshots (optional)
//   SAGEWS_KILL       a JSON argv that SIGKILLs the backend (optional): the page must
//                     reconnect by itself and run again
//   SAGEWS_BENCH      N: after the flow, measure in the browser (performance.now()) page load
//                     to interactive (N/10 fresh loads) and Run `1+1` click to output painted
//                     (N runs), and print p50/p99 and the static assets' gzipped sizes
// Prints one JSON line with what it measured; exits non-zero on any failure.
import { execFile } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import https from 'node:https';
import assert from 'node:assert/strict';
import { open, until } from './webdriver.mjs';

const env = process.env;
const url = new URL(env.SAGEWS_URL);
const user = env.SAGEWS_USER;
const transport = env.SAGEWS_TRANSPORT || 'websocket';
const phone = env.SAGEWS_PHONE === '1';
const tag = `${user}-${transport}${phone ? '-phone' : ''}`;
const step = (what) => console.error(`[${tag}] ${what}`);

// The browser (./webdriver.mjs), and its helpers once it is open.
let b, s, g, find, findAll, click, type, clear, text, js, shot; // eslint-disable-line one-var
const state = () => js('return document.querySelector("#connection-state").dataset.state');
const cellStatus = (n) => js(`return document.querySelector(".cell:nth-child(${n})").dataset.status`);
async function setCode(n, code) {
  await clear(`.cell:nth-child(${n}) textarea`);
  await type(`.cell:nth-child(${n}) textarea`, code);
}
async function run(n, code, want = 'ok', ms = 60000) {
  await setCode(n, code);
  await click(`.cell:nth-child(${n}) .run`);
  await until(`cell ${n} to end (${code})`, async () => {
    const st = await cellStatus(n);
    if (st !== 'running' && st !== 'idle' && st !== want) throw new Error(`status ${st}: ${await text(`.cell:nth-child(${n}) .output`)}`);
    return st === want;
  }, ms);
  return text(`.cell:nth-child(${n}) .output`);
}
// The published file, fetched from node through HAProxy (trusting the CA, resolving by hand).
function fetchPublished(path) {
  return new Promise(async (resolve, reject) => {
    const ca = await readFile(env.SAGEWS_CA);
    const req = https.get({ host: url.hostname, servername: url.hostname, path, ca,
      lookup: (_h, o, cb) => (o && o.all ? cb(null, [{ address: env.SAGEWS_ADDRESS, family: 4 }]) : cb(null, env.SAGEWS_ADDRESS, 4)) }, (r) => {
      let body = '';
      r.on('data', (c) => { body += c; });
      r.on('end', () => resolve({ status: r.statusCode, body, csp: r.headers['content-security-policy'] || '' }));
    });
    req.on('error', reject);
  });
}

const pct = (xs, p) => {
  const v = [...xs].sort((a, b) => a - b);
  return Math.round(v[Math.min(v.length - 1, Math.floor((p / 100) * v.length))] * 10) / 10;
};

// Measured in the page: fresh loads to the first usable view, then Run clicks to the answer
// painted (a MutationObserver sees the output, the next animation frame is the paint).
async function bench(n, id) {
  step(`bench: ${Math.max(5, Math.round(n / 10))} loads, ${n} runs`);
  await s('/timeouts', { script: 600000 });
  const loads = [];
  for (let i = 0; i < Math.max(5, Math.round(n / 10)); i++) {
    await s('/url', { url: `${url.origin}/?transport=${transport}&load=${i}#w/${id}` });
    await until('interactive', async () => js('return performance.getEntriesByName("sagews-interactive").length > 0'));
    loads.push(await js('return performance.getEntriesByName("sagews-interactive")[0].startTime'));
  }
  await until('the workspace', async () => /^on \S/.test(await text('#worker-name')));
  const runs = await s('/execute/async', { args: [n], script: `
    const [n, done] = arguments;
    const cell = document.querySelector('.cell');
    const code = cell.querySelector('textarea'), out = cell.querySelector('.output');
    (async () => {
      const times = [];
      for (let i = 0; i < n; i++) {
        code.value = i + '+1';
        code.dispatchEvent(new Event('input', { bubbles: true }));
        const want = String(i + 1);
        const t = performance.now();
        const seen = new Promise((resolve) => {
          const ok = () => cell.dataset.status === 'ok' && out.textContent.trim() === want;
          const obs = new MutationObserver(() => { if (ok()) { obs.disconnect(); requestAnimationFrame(() => resolve()); } });
          obs.observe(cell, { subtree: true, childList: true, characterData: true, attributes: true });
        });
        cell.querySelector('.run').click();
        await seen;
        times.push(performance.now() - t);
      }
      done(times);
    })().catch((e) => done({ error: String(e) }));` });
  if (!Array.isArray(runs)) throw new Error(`bench runs: ${JSON.stringify(runs)}`);
  const { gzipSync } = await import('node:zlib');
  const { readdir } = await import('node:fs/promises');
  const dir = new URL('../../static/', import.meta.url);
  let gz = 0;
  for (const f of await readdir(dir)) gz += gzipSync(await readFile(new URL(f, dir)), { level: 5 }).length;
  return {
    load_to_interactive_ms: { n: loads.length, p50: pct(loads, 50), p99: pct(loads, 99) },
    run_1_plus_1_ms: { n: runs.length, p50: pct(runs, 50), p99: pct(runs, 99), max: pct(runs, 100) },
    static_gzipped_bytes: gz,
  };
}

const measured = { user, transport, phone };
try {
  b = await open(['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
    `--host-resolver-rules=MAP ${url.hostname} ${env.SAGEWS_ADDRESS}`,
    phone ? '--window-size=375,800' : '--window-size=1280,900'], { shots: env.SAGEWS_SHOTS, prefix: `${tag}-` });
  ({ s, g, find, findAll, click, type, clear, text, js, shot } = b);
  if (phone) await b.cdp('Emulation.setDeviceMetricsOverride', { width: 375, height: 800, deviceScaleFactor: 2, mobile: true });

  step('load the page');
  const t0 = Date.now();
  await s('/url', { url: `${url.origin}/?transport=${transport}` });
  await until('the sign-in form', async () => !(await js('return document.querySelector("#auth-view").hidden')));
  measured.load_ms = Date.now() - t0;
  await shot('1-signin');
  await type('#signup-name', user);
  await type('#signup-password', 'a long password');
  await click('#signup-button');
  await until('the workspace list', async () => !(await js('return document.querySelector("#list-view").hidden')));
  await until('the connection', async () => (await state()) === 'open');
  assert.equal(await js('return window.performance.getEntriesByType("navigation")[0].name.startsWith("https://")'), true);

  step('create and open a workspace');
  const name = `Project of ${user}`;
  await type('#new-workspace-name', name);
  await click('#create-workspace');
  await until('the workspace in the list', async () => (await findAll('.workspace-item')).length === 1);
  const id = await js('return document.querySelector(".workspace-item").dataset.workspaceId');
  await shot('2-list');
  await click(`#open-${id}`);
  await until('the workspace', async () => /^on \S/.test(await text('#worker-name')));
  const notice = await js('return document.querySelector("#notice").hidden ? "" : document.querySelector("#notice-text").textContent');
  assert.doesNotMatch(notice, /fail|error/i, 'no error shown on opening');

  // Every control has an accessible name.
  const unnamed = await js(`return [...document.querySelectorAll('button, input, textarea, select, a[href]')]
    .filter((e) => !e.closest('[hidden]') && !e.closest('template'))
    .filter((e) => !((e.labels && e.labels.length) || e.getAttribute('aria-label') || e.getAttribute('aria-labelledby') || e.textContent.trim() || e.title))
    .map((e) => e.outerHTML.slice(0, 80))`);
  assert.deepEqual(unnamed, [], 'controls without an accessible name');

  step('run 2+2');
  assert.match(await run(1, '2+2'), /^4\s*$/);

  step('a loop that prints for a while: output arrives before it ends, then interrupt');
  await setCode(1, 'import time\nfor i in range(60):\n    print("tick", i, flush=True)\n    time.sleep(0.25)');
  await click('.cell:nth-child(1) .run');
  await until('streamed output', async () => /tick 2/.test(await text('.cell:nth-child(1) .output')));
  assert.equal(await cellStatus(1), 'running', 'output arrived while the cell runs');
  // Typing elsewhere while it streams.
  await click('#add-cell');
  await type('.cell:nth-child(2) textarea', '# typed while the loop runs');
  await click('.cell:nth-child(1) .interrupt');
  await until('interrupted', async () => (await cellStatus(1)) === 'interrupted');

  step('a plot');
  await run(2, 'import matplotlib.pyplot as plt\nplt.plot([1, 4, 9, 16])\nplt.title("squares")');
  await until('the figure', async () => js('const i = document.querySelector(".cell:nth-child(2) .output img.figure"); return !!i && i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0'));
  await shot('3-cells');

  step('files, save, change, save, revert');
  await click('#file-new');
  await type('#file-path', 'notes.txt');
  await type('#file-editor', 'first version');
  await click('#file-save');
  await until('notes.txt listed', async () => (await findAll('#files-list .file-item[data-path="notes.txt"]')).length === 1);
  await type('#save-message', 'first');
  await click('#save');
  await until('saved', async () => /^Saved/.test(await text('#save-result')));
  assert.match(await run(1, 'print(open("notes.txt").read())'), /first version/);
  await clear('#file-editor');
  await type('#file-editor', 'second version');
  await click('#file-save');
  await until('the second version written', async () => /second version/.test(await run(1, 'print(open("notes.txt").read())')));
  await clear('#save-message');
  await type('#save-message', 'second');
  await click('#save');
  await until('two saves', async () => (await findAll('#history-list .history-item')).length >= 2);
  // The older save is the last in the list (newest first).
  const saves = await findAll('#history-list .history-item');
  await click(`#history-list .history-item:nth-child(${saves.length}) .revert`);
  await click('#dialog-ok');
  await until('three saves', async () => (await findAll('#history-list .history-item')).length === saves.length + 1);
  await click('#files-list .file-item[data-path="notes.txt"]');
  await until('the old contents back', async () => (await js('return document.querySelector("#file-editor").value')) === 'first version');
  assert.match(await run(1, 'print(open("notes.txt").read())'), /first version/);

  step('publish');
  await click('#publish');
  await until('the link', async () => (await text('#publish-link')) === `${url.origin}/pub/${id}/`);
  const pub = await fetchPublished(`/pub/${id}/notes.txt`);
  assert.equal(pub.status, 200);
  assert.equal(pub.body, 'first version');
  assert.match(pub.csp, /^sandbox/);
  await shot('4-workspace');

  if (env.SAGEWS_KILL) {
    step('the backend is killed: the page reconnects by itself and runs again');
    const argv = JSON.parse(env.SAGEWS_KILL);
    await new Promise((res, rej) => execFile(argv[0], argv.slice(1), (e) => (e ? rej(e) : res())));
    const t = Date.now();
    await until('the page to notice', async () => (await state()) !== 'open', 60000).catch(() => {});
    await until('reconnected', async () => (await state()) === 'open', 90000);
    assert.match(await run(1, '1+1', 'ok', 90000), /^2\s*$/);
    measured.reconnect_ms = Date.now() - t;
  }

  step('run 1+1 timed in the browser');
  const times = [];
  for (let i = 0; i < 5; i++) {
    await setCode(1, `${i}+1`);
    const t = await js('return performance.now()');
    await click('.cell:nth-child(1) .run');
    await until('the answer', async () => (await cellStatus(1)) === 'ok' && (await text('.cell:nth-child(1) .output')).trim() === String(i + 1));
    times.push((await js('return performance.now()')) - t);
  }
  measured.run_ms = times;

  if (env.SAGEWS_BENCH) {
    measured.bench = await bench(Number(env.SAGEWS_BENCH), id);
    await s('/url', { url: `${url.origin}/?transport=${transport}#w/${id}` });
    await until('the workspace again', async () => /^on \S/.test(await text('#worker-name')));
  }

  step('sign out and in: the workspace is there, nobody else\'s');
  await click('#back');
  await click('#signout');
  await until('signed out', async () => !(await js('return document.querySelector("#auth-view").hidden')));
  await type('#signin-name', user);
  await type('#signin-password', 'a long password');
  await click('#signin-button');
  await until('the list again', async () => (await findAll('.workspace-item')).length >= 1);
  const names = await js('return [...document.querySelectorAll(".workspace-item .open")].map(e => e.textContent)');
  assert.deepEqual(names, [name], 'only this account\'s workspaces');
  await shot('5-list-again');

  const logs = await b.logs();
  const csp = logs.filter((l) => /Content.Security.Policy|Refused to/i.test(l.message));
  assert.deepEqual(csp, [], `CSP violations: ${JSON.stringify(csp)}`);
  // Expected: the page asks whoami before anyone signed in (401).
  const bad = logs.filter((l) => l.level === 'SEVERE'
    && !/\/api\/whoami - Failed to load resource: the server responded with a status of 401/.test(l.message)
    && !/WebSocket connection .* failed|ERR_INCOMPLETE_CHUNKED_ENCODING|ERR_EMPTY_RESPONSE|ERR_CONNECTION|50[23] \(|xhr_send|\/xhr\b|xhr_streaming/.test(l.message));
  assert.deepEqual(bad, [], `console errors: ${JSON.stringify(bad, null, 1)}`);
  measured.workspace = id;
  console.log(JSON.stringify(measured));
} catch (e) {
  try { await shot('failure'); } catch { /* no session */ }
  console.error(`[${tag}] FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  if (b) await b.close();
}
