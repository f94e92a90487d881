// Drives the page in headless Chromium (through chromedriver, by plain WebDriver HTTP calls)
// against tests/js/fake_backend.mjs, at phone and desktop widths, and fails on any console
// error (a CSP violation shows there). Not part of `node --test` (it needs a browser):
//   node tests/js/page_smoke.mjs [screenshot-dir]
import assert from 'node:assert/strict';
import { startFakeBackend } from './fake_backend.mjs';
import { open, until as wait } from './webdriver.mjs';

const shots = process.argv[2];
const server = await startFakeBackend(0);
const base = `http://127.0.0.1:${server.address().port}`;

// The browser (./webdriver.mjs), and its helpers once it is open.
let b, s, g, find, findAll, click, type, clear, text, js, shot; // eslint-disable-line one-var
const until = (what, fn, ms = 8000) => wait(what, fn, ms);

try {
  b = await open(['--headless=new', '--no-sandbox', '--disable-gpu', '--window-size=375,800'], { shots });
  ({ s, g, find, findAll, click, type, clear, text, js, shot } = b);
  const cdp = (cmd, params) => b.cdp(cmd, params);
  await cdp('Emulation.setDeviceMetricsOverride', { width: 375, height: 800, deviceScaleFactor: 1, mobile: true });
  await s('/url', { url: base });
  await until('the sign-in form', async () => !(await js('return document.querySelector("#auth-view").hidden')));
  await shot('1-signin-phone');
  await type('#signin-name', 'ada');
  await type('#signin-password', 'wrong password');
  await click('#signin-button');
  await until('a sign-in error', async () => (await text('#signin-error')).includes('wrong name or password'));
  await type('#signup-name', 'ada');
  await type('#signup-password', 'a long password');
  await click('#signup-button');
  await until('the workspace list', async () => (await findAll('.workspace-item')).length === 1);
  assert.equal(await text('#account-name'), 'ada');
  // Not an operator: no operators' page.
  assert.equal(await js('return document.querySelector("#ops-view").hidden'), true);
  await until('the connection', async () => (await js('return document.querySelector("#connection-state").dataset.state')) === 'open');

  await type('#new-workspace-name', 'Notes');
  await click('#create-workspace');
  await until('two workspaces', async () => (await findAll('.workspace-item')).length === 2);
  await shot('2-list-phone');
  const id = await js('return [...document.querySelectorAll(".workspace-item")].find(e => e.textContent.includes("Notes")).dataset.workspaceId');
  await click(`#open-${id}`);
  await until('the workspace', async () => (await text('#worker-name')) === 'on worker1');
  assert.equal(await text('#workspace-title'), 'Notes');

  // A long cell streams while another runs; Shift+Enter runs and moves on.
  await type('.cell textarea', 'sleep(4)');
  await click('.cell .run');
  await click('#add-cell');
  const cells = await findAll('.cell textarea');
  assert.equal(cells.length, 2);
  await s(`/element/${cells[1]}/value`, { text: 'plot()' });
  await s('/actions', { actions: [{ type: 'key', id: 'k', actions: [
    { type: 'keyDown', value: '\uE008' }, { type: 'keyDown', value: '\uE007' }, { type: 'keyUp', value: '\uE007' }, { type: 'keyUp', value: '\uE008' }] }] });
  await until('the figure', async () => (await findAll('.cell:nth-child(2) .output img.figure')).length === 1);
  assert.equal((await findAll('.cell')).length, 3, 'Shift+Enter on the last cell adds one');
  await until('streamed output', async () => /tick 1/.test(await text('.cell:nth-child(1) .output')));
  assert.equal(await js('return document.querySelector(".cell:nth-child(1)").dataset.status'), 'running');
  await until('the long cell to end', async () => (await js('return document.querySelector(".cell:nth-child(1)").dataset.status')) === 'ok');
  assert.match(await text('.cell:nth-child(1) .output'), /tick 10/);
  await s(`/element/${(await findAll('.cell textarea'))[2]}/value`, { text: 'error' });
  await click('.cell:nth-child(3) .run');
  await until('an error', async () => (await js('return document.querySelector(".cell:nth-child(3)").dataset.status')) === 'error');
  assert.equal((await findAll('.cell:nth-child(3) .output .stderr')).length, 1);
  await shot('3-cells-phone');

  // Interrupt.
  await clear('.cell:nth-child(1) textarea');
  await type('.cell:nth-child(1) textarea', 'sleep(10)');
  await click('.cell:nth-child(1) .run');
  await until('output', async () => /tick 1/.test(await text('.cell:nth-child(1) .output')));
  await click('.cell:nth-child(1) .interrupt');
  await until('interrupted', async () => (await text('.cell:nth-child(1) .status')) === 'Interrupted');

  // Workspace events reach the banner.
  const post = (path, obj) => fetch(base + path, { method: 'POST', body: JSON.stringify(obj || {}) });
  await post('/test/event', { event: 'worker_lost', workspace: id, worker: 'worker1' });
  await until('worker lost', async () => (await js('return document.querySelector("#connection-state").dataset.state')) === 'worker_lost');
  await post('/test/event', { event: 'moved', workspace: id, worker: 'worker2', message: 'worker worker1 was lost; the workspace was reopened from its last save' });
  await until('moved', async () => /Moved to worker worker2/.test(await text('#connection-text')));
  assert.equal(await text('#worker-name'), 'on worker2');

  // The backend goes away while a cell runs: the cell is marked, the page reconnects, the
  // workspace is opened again and cells run again.
  await clear('.cell:nth-child(1) textarea');
  await type('.cell:nth-child(1) textarea', 'sleep(10)');
  await click('.cell:nth-child(1) .run');
  await until('output', async () => /tick 1/.test(await text('.cell:nth-child(1) .output')));
  await post('/test/drop');
  await until('the cell marked lost', async () => (await js('return document.querySelector(".cell:nth-child(1)").dataset.status')) === 'lost');
  await until('reconnected', async () => /Reconnected/.test(await text('#connection-text')), 15000);
  await clear('.cell:nth-child(1) textarea');
  await type('.cell:nth-child(1) textarea', '1+1');
  await click('.cell:nth-child(1) .run');
  await until('a run after the reconnect', async () => /ran: 1\+1/.test(await text('.cell:nth-child(1) .output')));

  // Files.
  await click('#file-new');
  await type('#file-path', 'notes/a.py');
  await type('#file-editor', 'x = 1\n');
  await click('#file-save');
  await until('the new file in the list', async () => (await findAll('#files-list .file-item[data-path="notes/a.py"]')).length === 1);
  await click('#files-list .file-item[data-path="README.md"]');
  await until('README in the editor', async () => (await js('return document.querySelector("#file-editor").value')).startsWith('# Notes'));

  // Save, history, publish.
  await type('#save-message', 'First draft');
  await click('#save');
  await until('saved', async () => (await text('#save-result')).startsWith('Saved'));
  await until('the history', async () => (await findAll('#history-list .history-item')).length === 1);
  await click('#files-list .file-item[data-path="notes/a.py"]');
  await until('a.py open', async () => (await js('return document.querySelector("#file-path").value')) === 'notes/a.py');
  await click('#file-delete');
  await click('#dialog-ok');
  await until('a.py gone', async () => (await findAll('#files-list .file-item[data-path="notes/a.py"]')).length === 0);
  await type('#save-message', 'Removed a.py');
  await click('#save');
  await until('two saves', async () => (await findAll('#history-list .history-item')).length === 2);
  await click('#history-list .history-item:nth-child(2) .revert');
  await click('#dialog-ok');
  await until('a.py back', async () => (await findAll('#files-list .file-item[data-path="notes/a.py"]')).length === 1);
  await click('#publish');
  await until('the link', async () => (await text('#publish-link')) === `https://sage.example.org/pub/${id}/`);
  await shot('4-side-phone');

  // Desktop width, then back to the list: rename and delete.
  await s('/window/rect', { width: 1280, height: 900 });
  await cdp('Emulation.clearDeviceMetricsOverride');
  await js('window.scrollTo(0, 0)');
  await shot('5-workspace-desktop');
  await click('#back');
  await until('the list', async () => !(await js('return document.querySelector("#list-view").hidden')));
  await click(`#rename-${id}`);
  await clear('#dialog-input');
  await type('#dialog-input', 'Lecture notes');
  await click('#dialog-ok');
  await until('renamed', async () => (await text(`#open-${id}`)) === 'Lecture notes');
  assert.match(await text(`.workspace-item[data-workspace-id="${id}"]`), /published/);
  await shot('6-list-desktop');
  await click(`#delete-${id}`);
  await click('#dialog-ok');
  await until('deleted', async () => (await findAll('.workspace-item')).length === 1);
  await click('#signout');
  await until('signed out', async () => !(await js('return document.querySelector("#auth-view").hidden')));

  // The operator sees the workers, backends and audit records, and drains a worker.
  await clear('#signup-name');
  await type('#signup-name', 'operator');
  await type('#signup-password', 'a long password');
  await click('#signup-button');
  await until('the operators\' page', async () => !(await js('return document.querySelector("#ops-view").hidden')));
  assert.equal((await findAll('#ops-workers tbody tr.ops-worker')).length, 2);
  assert.equal((await findAll('#ops-backends tbody tr.ops-backend')).length, 1);
  assert.match(await text('#ops-audit'), /ran sagectl up/);
  await click('#drain-worker1');
  await click('#dialog-ok');
  await until('worker1 draining', async () => (await js('return document.querySelector(\'tr.ops-worker[data-host="worker1"]\').dataset.draining')) === 'true');
  assert.equal(await text('tr.ops-worker[data-host="worker1"] .state'), 'draining');
  assert.match(await text('#ops-audit'), /drained worker worker1/);
  await shot('7-operators-desktop');
  await click('#drain-worker1');
  await until('worker1 back', async () => (await js('return document.querySelector(\'tr.ops-worker[data-host="worker1"]\').dataset.draining')) === 'false');
  await click('#signout');
  await until('signed out again', async () => !(await js('return document.querySelector("#auth-view").hidden')));

  const logs = await b.logs();
  const bad = logs.filter((l) => l.level === 'SEVERE' && !/401 \(Unauthorized\)|wrong name or password/.test(l.message)
    && !/WebSocket connection .* failed/.test(l.message)
    && !/xhr_streaming - Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING/.test(l.message)); // the drop above
  assert.deepEqual(bad, [], `console errors: ${JSON.stringify(bad, null, 1)}`);
  console.log('page smoke: ok');
} catch (e) {
  try { await shot('failure'); } catch { /* no session */ }
  console.error(e);
  process.exitCode = 1;
} finally {
  if (b) await b.close();
  server.close();
  server.closeAllConnections();
}
