'use strict';
const vm = require('vm'); const fs = require('fs'); const net = require('net');
const inFd = +process.env.SBX_REPL_IN, outFd = +process.env.SBX_REPL_OUT;
delete process.env.SBX_REPL_IN; delete process.env.SBX_REPL_OUT;
const sandbox = {console, require, process, Buffer, setTimeout, clearTimeout, setInterval, clearInterval,
  setImmediate, clearImmediate, URL, URLSearchParams, TextEncoder, TextDecoder, queueMicrotask,
  structuredClone, module: {exports: {}}, __dirname: process.cwd(), __filename: '<session>'};
const ctx = vm.createContext(sandbox);
const report = (e) => {
  try { process.stderr.write((e && e.stack ? e.stack : String(e)) + '\n'); } catch (_) {}
};
process.on('uncaughtException', report); process.on('unhandledRejection', report);
let buf = Buffer.alloc(0); let busy = false; const queue = []; let n = 0;
async function pump() {
  if (busy) return; busy = true;
  while (queue.length) {
    const code = queue.shift(); let rc = 0; n += 1;
    try {
      const r = vm.runInContext(code, ctx, {filename: '<session-' + n + '>'});
      if (r && typeof r.then === 'function') await r;
    } catch (e) { report(e); rc = 1; }
    fs.writeSync(outFd, rc + '\n');
  }
  busy = false;
}
const input = new net.Socket({fd: inFd, readable: true, writable: false});
input.on('data', (d) => {
  buf = Buffer.concat([buf, d]);
  for (;;) {
    const nl = buf.indexOf(10); if (nl < 0) break;
    const len = parseInt(buf.subarray(0, nl).toString(), 10);
    if (buf.length < nl + 1 + len) break;
    queue.push(buf.subarray(nl + 1, nl + 1 + len).toString('utf8'));
    buf = buf.subarray(nl + 1 + len);
  }
  pump();
});
input.on('end', () => process.exit(0));
