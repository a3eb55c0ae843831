// JavaScript REPL driver of the guest agent (run with `node -e <this source>`).
//
// Protocol: the agent writes blocks to the fd named by SBX_REPL_IN as `<length>\n<code>`; each
// block runs in Node's own global context (vm.runInThisContext, like another <script>), so user
// code sees Node's normal globals (performance, fetch, crypto, AbortController, atob, Blob,
// global, and require/module/exports/__filename/__dirname as `node -e` defines them) and what an
// earlier block declared. A returned promise is awaited. `r<length>\n<code>`: give this process
// its own randomness first (a restored or forked clone): OpenSSL's DRBGs through the reseed.node
// addon named by SBX_REPL_RESEED, and Math.random (V8 cannot reseed its own) from them. `<exit code>\n` goes to the fd named by
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
  const reseedAddon = process.env.SBX_REPL_RESEED;
  delete process.env.SBX_REPL_RESEED;
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
  // Loaded now, at start-up (before a snapshot is taken): after a restore only the calls remain,
  // not the dlopen and module loading, which TCG would first have to translate.
  const crypto = cjs.require('crypto');
  // The same for what a first console.log needs: the stdout/stderr streams (made on first use) and
  // the formatting code (V8 compiles functions lazily; compiled now, they are in the snapshot).
  void process.stdout;
  void process.stderr;
  cjs.require('util').format('%s %d %j %o', 'a', 1, {b: [2]}, [null]);
  let addon = null;
  try {
    addon = reseedAddon ? cjs.require(reseedAddon) : null;
  } catch (_) { /* not loadable: a reseed fails closed below */ }
  const pool = Buffer.alloc(8 * 256);
  let pos = pool.length;
  function random() {
    if (pos >= pool.length) {
      crypto.randomFillSync(pool);
      pos = 0;
    }
    const hi = pool.readUInt32BE(pos) >>> 5;
    const lo = pool.readUInt32BE(pos + 4) >>> 6;
    pos += 8;
    return (hi * 67108864 + lo) / 9007199254740992;
  }
  const reseed = () => {
    // Fails closed: a clone that cannot get its own randomness must not run user code.
    let ok = false;
    try {
      ok = addon !== null && addon.reseed() === true;
    } catch (_) { /* fails closed below */ }
    if (!ok) {
      try { process.stderr.write('[sandbox] cannot reseed the JavaScript interpreter\n'); } catch (_) { /* */ }
      process.exit(70);
    }
    pos = pool.length; // nothing drawn before the reseed is handed out after it
    Object.defineProperty(Math, 'random', {value: random, writable: true, enumerable: false, configurable: true});
  };
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
      const [mark, code] = queue.shift();
      if (mark) reseed();
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
      let head = buf.subarray(0, nl).toString();
      const mark = head[0] === 'r';
      if (mark) head = head.slice(1);
      const len = parseInt(head, 10);
      if (buf.length < nl + 1 + len) break;
      queue.push([mark, buf.subarray(nl + 1, nl + 1 + len).toString('utf8')]);
      buf = buf.subarray(nl + 1 + len);
    }
    pump();
  });
  input.on('end', () => process.exit(0));
})();
