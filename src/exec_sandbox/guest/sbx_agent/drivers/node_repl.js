// JavaScript REPL driver of the guest agent (run with `node -e <this source>`).
//
// Protocol: the agent writes blocks to the fd named by SBX_REPL_IN as `<length>\n<code>`; each
// block runs in Node's own global context (vm.runInThisContext, like another <script>), so user
// code sees Node's normal globals (performance, fetch, crypto, AbortController, atob, Blob,
// global, and require/module/exports/__filename/__dirname as `node -e` defines them) and what an
// earlier block declared. A returned promise is awaited. `<exit code>\n` goes to the fd named by
// SBX_REPL_OUT after the block. EOF on the input ends the driver. Everything of the driver's own
// lives inside this function: user code sees none of its names.
'use strict';
(() => {
  const vm = require('vm');
  const fs = require('fs');
  const net = require('net');
  const inFd = +process.env.SBX_REPL_IN;
  const outFd = +process.env.SBX_REPL_OUT;
  delete process.env.SBX_REPL_IN;
  delete process.env.SBX_REPL_OUT;
  // `node -e` defines these as globals while its script runs; once it has returned, `module` is
  // the builtin module of that name. Blocks run later: they get the -e ones back, once.
  const cjs = {module, exports, require, __filename, __dirname};
  let cjsRestored = false;
  // The driver's own frames are not the user's business.
  const own = /\[eval\]|node:vm:|node:internal\/(vm|streams|process\/task_queues)|stream_base_commons|node:events:/;
  const report = (e) => {
    let text = e && e.stack ? String(e.stack) : String(e);
    text = text.split('\n').filter((line) => !(/^\s+at /.test(line) && own.test(line))).join('\n');
    try { process.stderr.write(text + '\n'); } catch (_) { /* stderr gone */ }
  };
  process.on('uncaughtException', report);
  process.on('unhandledRejection', report);
  let buf = Buffer.alloc(0);
  let busy = false;
  const queue = [];
  let n = 0;
  async function pump() {
    if (busy) return;
    busy = true;
    if (!cjsRestored) {
      cjsRestored = true;
      for (const [k, v] of Object.entries(cjs)) {
        Object.defineProperty(globalThis, k, {value: v, writable: true, enumerable: true, configurable: true});
      }
    }
    while (queue.length) {
      const code = queue.shift();
      let rc = 0;
      n += 1;
      try {
        const r = vm.runInThisContext(code, {filename: '<session-' + n + '>'});
        if (r && typeof r.then === 'function') await r;
      } catch (e) {
        report(e);
        rc = 1;
      }
      fs.writeSync(outFd, rc + '\n');
    }
    busy = false;
  }
  const input = new net.Socket({fd: inFd, readable: true, writable: false});
  input.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const nl = buf.indexOf(10);
      if (nl < 0) break;
      const len = parseInt(buf.subarray(0, nl).toString(), 10);
      if (buf.length < nl + 1 + len) break;
      queue.push(buf.subarray(nl + 1, nl + 1 + len).toString('utf8'));
      buf = buf.subarray(nl + 1 + len);
    }
    pump();
  });
  input.on('end', () => process.exit(0));
})();
