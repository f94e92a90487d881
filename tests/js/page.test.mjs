// The page in headless Chromium against the fake backend (tests/js/page_smoke.mjs). Opt-in:
// it needs chromium and chromedriver. SAGEWS_BROWSER_TEST=1 node --test tests/js/
import { test } from 'node:test';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const skip = process.env.SAGEWS_BROWSER_TEST ? false : 'set SAGEWS_BROWSER_TEST=1 (needs chromium and chromedriver)';

test('the page works in a browser: sign-up to publish, at phone and desktop widths', { skip }, () => {
  execFileSync(process.execPath, [fileURLToPath(new URL('./page_smoke.mjs', import.meta.url))],
    { stdio: 'inherit', timeout: 240000 });
});
