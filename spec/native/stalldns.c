/*
 * stalldns.c: bgworker_stalldns.so, a resolver that never answers, for
 * spec/dns_spec.lua. Not a Lua module: a child interpreter loads it with
 * LD_PRELOAD, and its getaddrinfo takes the place of the C library's for
 * the whole process, bgworker.dns_native's threads included. So the specs
 * drive the real lookup path (the Lua layer, tokens, the worker threads
 * and their bounds, the call to getaddrinfo) against a server that never
 * replies, without a network.
 *
 * A name ending in ".stall.test" blocks for BGWORKER_STALL_SECONDS
 * (default 2), then fails with EAI_AGAIN, as the system resolver does when
 * its servers never reply: every call returns in the end, so the threads
 * that made them end too. Any other name goes to the C library.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STALLED_SUFFIX ".stall.test"

typedef int getaddrinfo_fn(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static int stalled(const char *node)
{
    size_t n = node ? strlen(node) : 0, k = strlen(STALLED_SUFFIX);
    return n >= k && strcmp(node + n - k, STALLED_SUFFIX) == 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res)
{
    if (stalled(node)) {
        const char *text = getenv("BGWORKER_STALL_SECONDS");
        double seconds = text ? atof(text) : 2.0;
        struct timespec left = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
        while (nanosleep(&left, &left) != 0 && errno == EINTR) {
        }
        return EAI_AGAIN;
    }
    getaddrinfo_fn *next = (getaddrinfo_fn *)dlsym(RTLD_NEXT, "getaddrinfo");
    return next ? next(node, service, hints, res) : EAI_SYSTEM;
}
