/* Node-API addon of the JavaScript REPL driver: reseed() gives a restored or forked clone of a warm
 * node process its own OpenSSL randomness.
 *
 * OpenSSL's DRBGs live in the process: every clone of one snapshot would draw the same
 * crypto.randomBytes / randomUUID / key material until their next scheduled reseed. RAND_add()
 * reseeds the primary DRBG (fresh entropy from getrandom(), which the agent reseeded first, plus
 * these bytes); the per-thread DRBGs reseed from it on their next use. Restarting node instead costs
 * a whole start-up under TCG (~3-5 s after a restore, when nothing of node is translated yet).
 *
 * Built by the image builder (cc -shared); no headers needed: the few Node-API and OpenSSL symbols
 * are declared here and resolved from the node binary (and its libcrypto) when loaded. */
#include <fcntl.h>
#include <stddef.h>
#include <unistd.h>

typedef struct napi_env__ *napi_env;
typedef struct napi_value__ *napi_value;
typedef struct napi_callback_info__ *napi_callback_info;
typedef int napi_status;
typedef napi_value (*napi_callback)(napi_env, napi_callback_info);

extern napi_status napi_create_function(napi_env, const char *, size_t, napi_callback, void *, napi_value *);
extern napi_status napi_set_named_property(napi_env, napi_value, const char *, napi_value);
extern napi_status napi_get_boolean(napi_env, _Bool, napi_value *);
extern void RAND_add(const void *buf, int num, double randomness);
extern int RAND_status(void);

static napi_value reseed(napi_env env, napi_callback_info info) {
    (void)info;
    unsigned char buf[48];
    size_t got = 0;
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    while (fd >= 0 && got < sizeof buf) {
        ssize_t n = read(fd, buf + got, sizeof buf - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    if (fd >= 0) close(fd);
    _Bool ok = got == sizeof buf;
    if (ok) {
        RAND_add(buf, (int)sizeof buf, (double)sizeof buf);
        ok = RAND_status() == 1;
    }
    napi_value result;
    napi_get_boolean(env, ok, &result);
    return result;
}

napi_value napi_register_module_v1(napi_env env, napi_value exports) {
    napi_value fn;
    if (napi_create_function(env, "reseed", 6, reseed, NULL, &fn) == 0)
        napi_set_named_property(env, exports, "reseed", fn);
    return exports;
}
