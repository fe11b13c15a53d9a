/*
 * bench.c: module bgworker_bench, the lean producer of the benchmarks
 * (bench/run.lua). Like any utility library it includes bgworker.h only.
 *
 * Each item carries three numbers to callback(p, seq, x): the producer
 * (1..producers), a sequence number (1..items, per producer) and x, the
 * CLOCK_MONOTONIC time of the deliver in microseconds (see now()) when the
 * job stamps its items, else 0. Its decode is static and allocates nothing;
 * so does delivering, unless asked:
 *   alloc = "static"  (default) every item lives in an array made and touched
 *                     before the threads start; free_data does nothing.
 *   alloc = "malloc"  every item is malloc'd by its producer and freed by the
 *                     helper with free() (free_data NULL).
 *   alloc = "copy"    every item is made on the producer's stack and delivered
 *                     with deliver_copy: the helper copies it into its queue.
 *
 *   bench.produce(opts) -> job
 *     Start opts.producers threads (default 1), each delivering opts.items
 *     items (default 1) as fast as it can, or one every opts.interval_us
 *     microseconds (absolute deadlines, so delays do not add up).
 *     opts.callback (function) is required.
 *     opts.stamp: stamp each item with the time (x). By default only paced
 *     jobs (interval_us) stamp: a clock read costs a saturated producer
 *     about a third of its time here, which is not the helper's.
 *     opts.udp_port: instead of delivering, send each stamp x as a datagram
 *     ("%.3f") to 127.0.0.1:udp_port: the raw wake-up the helper is
 *     measured against. No callback then.
 *   job:join() -> ok, rejected
 *     Wait for the threads; how many delivers returned BGW_OK and anything
 *     else. The job's __gc joins too, then frees the static arrays and the
 *     callback: keep the job until its items are decoded or cancelled.
 *   job:started() -> the time (as now()) the first thread was started,
 *     after the static arrays were made: where a throughput run begins.
 *   bench.now() -> CLOCK_MONOTONIC in microseconds, as a float.
 *   bench.trim(): malloc_trim(0), so that RSS shows what is still in use.
 *   bench.ITEM_SIZE: the bytes of one item (its payload).
 */
#define _POSIX_C_SOURCE 200809L

#include <arpa/inet.h>
#include <malloc.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "bgworker.h"

#define JOB_MT "bgworker_bench.job"
#define MAX_PRODUCERS 64

#if LUA_VERSION_NUM < 502
#define setfuncs(L, l) luaL_register(L, NULL, l)
#else
#define setfuncs(L, l) luaL_setfuncs(L, l, 0)
#endif

typedef struct bitem {
    int callback; /* registry reference */
    int producer;
    long seq;
    double x;
} bitem;

typedef struct producer {
    struct job *job;
    int id;
    bgw_handle *handle; /* the thread's; released when it ends */
    bitem *items; /* static mode: one per item */
    pthread_t thread;
    long ok, rejected;
} producer;

typedef struct job {
    bgw_api api; /* a copy: the published table belongs to the Lua state */
    int callback;
    long items;
    long interval_us;
    int udp_port; /* 0: deliver through the helper */
    int stamp;
    int copy; /* alloc = "copy" */
    int nproducers;
    int joined;
    double started;
    producer producers[MAX_PRODUCERS];
} job;

static double monotonic_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static int decode(lua_State *L, void *data)
{
    const bitem *it = data;
    lua_rawgeti(L, LUA_REGISTRYINDEX, it->callback);
    lua_pushinteger(L, it->producer);
    lua_pushinteger(L, it->seq);
    lua_pushnumber(L, it->x);
    return 4;
}

static void free_nothing(void *data)
{
    (void)data;
}

/* Wait until the next tick of the job's pace, if it has one. */
static void pace(const job *j, struct timespec *next)
{
    if (j->interval_us == 0)
        return;
    next->tv_nsec += j->interval_us * 1000;
    while (next->tv_nsec >= 1000000000L) {
        next->tv_nsec -= 1000000000L;
        next->tv_sec++;
    }
    clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, next, NULL);
}

static void fill(const producer *p, long seq, bitem *it)
{
    it->callback = p->job->callback;
    it->producer = p->id;
    it->seq = seq;
    it->x = p->job->stamp ? monotonic_us() : 0;
}

static int deliver_one(producer *p, long seq)
{
    const job *j = p->job;
    bitem copy, *it;
    if (j->copy) {
        fill(p, seq, &copy);
        return j->api.deliver_copy(p->handle, decode, &copy, sizeof copy, BGW_FOREVER);
    }
    it = p->items ? &p->items[seq - 1] : malloc(sizeof *it);
    if (it == NULL)
        return BGW_INVALID;
    fill(p, seq, it);
    return j->api.deliver(p->handle, decode, it, p->items ? free_nothing : NULL, BGW_FOREVER);
}

/* A socket connected to 127.0.0.1:port, or -1. */
static int udp_to(int port)
{
    struct sockaddr_in to;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    to.sin_port = htons((unsigned short)port);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&to, sizeof to) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static int send_one(int fd)
{
    char stamp[32];
    int n = snprintf(stamp, sizeof stamp, "%.3f", monotonic_us());
    return send(fd, stamp, (size_t)n, 0) == n ? BGW_OK : BGW_CLOSED;
}

static void *produce(void *arg)
{
    producer *p = arg;
    const job *j = p->job;
    int fd = j->udp_port ? udp_to(j->udp_port) : -1;
    struct timespec next;
    long seq;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (seq = 1; seq <= j->items; seq++) {
        pace(j, &next);
        if ((j->udp_port ? send_one(fd) : deliver_one(p, seq)) == BGW_OK)
            p->ok++;
        else
            p->rejected++;
    }
    if (fd >= 0)
        close(fd);
    j->api.release(p->handle);
    return NULL;
}

static long opt_int(lua_State *L, const char *name, long def, long min, long max)
{
    long v = def;
    lua_getfield(L, 1, name);
    if (!lua_isnil(L, -1)) {
        lua_Number n = lua_tonumber(L, -1);
        if (lua_type(L, -1) != LUA_TNUMBER || !(n >= min && n <= max) || n != (lua_Number)(long)n)
            luaL_error(L, "bench.produce: opts.%s must be an integer in %d..%d", name, (int)min,
                       (int)max);
        v = (long)n;
    }
    lua_pop(L, 1);
    return v;
}

static int is_string(lua_State *L, int index, const char *s)
{
    return lua_type(L, index) == LUA_TSTRING && strcmp(lua_tostring(L, index), s) == 0;
}

static void join_threads(job *j)
{
    int i;
    if (j->joined)
        return;
    j->joined = 1;
    for (i = 0; i < j->nproducers; i++)
        pthread_join(j->producers[i].thread, NULL);
}

static int b_produce(lua_State *L)
{
    const bgw_api *api = bgw_api_get(L);
    job *j;
    long producers, items, interval_us;
    int udp_port;
    int is_static, is_copy, stamp, i, created;
    luaL_checktype(L, 1, LUA_TTABLE);
    if (api == NULL)
        return luaL_error(L, "bench.produce: bgworker.core is not loaded");
    producers = opt_int(L, "producers", 1, 1, MAX_PRODUCERS);
    items = opt_int(L, "items", 1, 0, 1L << 30);
    interval_us = opt_int(L, "interval_us", 0, 0, 1000000);
    udp_port = (int)opt_int(L, "udp_port", 0, 0, 65535);
    lua_getfield(L, 1, "alloc");
    is_static = lua_isnil(L, -1) || is_string(L, -1, "static");
    is_copy = is_string(L, -1, "copy");
    if (!is_static && !is_copy && !is_string(L, -1, "malloc"))
        return luaL_error(L, "bench.produce: opts.alloc must be \"static\", \"malloc\" or \"copy\"");
    lua_getfield(L, 1, "callback");
    if (udp_port == 0)
        luaL_checktype(L, -1, LUA_TFUNCTION);
    lua_getfield(L, 1, "stamp");
    stamp = lua_isnil(L, -1) ? interval_us > 0 : lua_toboolean(L, -1);
    lua_pop(L, 1);

    j = lua_newuserdata(L, sizeof *j);
    memset(j, 0, sizeof *j);
    j->joined = 1; /* nothing to join until the threads exist */
    j->callback = LUA_NOREF;
    luaL_getmetatable(L, JOB_MT);
    lua_setmetatable(L, -2);
    j->api = *api;
    j->items = items;
    j->interval_us = interval_us;
    j->udp_port = udp_port;
    j->stamp = stamp;
    j->copy = is_copy;
    for (i = 0; i < producers; i++) {
        producer *p = &j->producers[i];
        p->job = j;
        p->id = i + 1;
        if (is_static && items > 0 && udp_port == 0) {
            p->items = malloc((size_t)items * sizeof *p->items);
            if (p->items == NULL)
                break;
            memset(p->items, 0, (size_t)items * sizeof *p->items); /* fault the pages in now */
        }
    }
    if (i < producers)
        return luaL_error(L, "bench.produce: out of memory"); /* __gc frees the arrays */
    if (udp_port == 0) {
        lua_pushvalue(L, -2);
        j->callback = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    j->started = monotonic_us();
    for (created = 0; created < producers; created++) {
        producer *p = &j->producers[created];
        p->handle = udp_port ? NULL : api->acquire(L);
        if (pthread_create(&p->thread, NULL, produce, p) != 0) {
            api->release(p->handle);
            break;
        }
    }
    j->nproducers = created;
    j->joined = 0;
    if (created < producers) {
        join_threads(j);
        return luaL_error(L, "bench.produce: pthread_create failed");
    }
    return 1;
}

static int b_join(lua_State *L)
{
    job *j = luaL_checkudata(L, 1, JOB_MT);
    long ok = 0, rejected = 0;
    int i;
    join_threads(j);
    for (i = 0; i < j->nproducers; i++) {
        ok += j->producers[i].ok;
        rejected += j->producers[i].rejected;
    }
    lua_pushinteger(L, ok);
    lua_pushinteger(L, rejected);
    return 2;
}

static int b_started(lua_State *L)
{
    job *j = luaL_checkudata(L, 1, JOB_MT);
    lua_pushnumber(L, j->started);
    return 1;
}

static int b_gc(lua_State *L)
{
    job *j = luaL_checkudata(L, 1, JOB_MT);
    int i;
    join_threads(j);
    for (i = 0; i < MAX_PRODUCERS; i++)
        free(j->producers[i].items);
    luaL_unref(L, LUA_REGISTRYINDEX, j->callback);
    return 0;
}

static int b_now(lua_State *L)
{
    lua_pushnumber(L, monotonic_us());
    return 1;
}

static int b_trim(lua_State *L)
{
    (void)L;
    malloc_trim(0);
    return 0;
}

int luaopen_bgworker_bench(lua_State *L)
{
    static const luaL_Reg methods[] = {{"join", b_join}, {"started", b_started}, {NULL, NULL}};
    static const luaL_Reg functions[] = {{"produce", b_produce}, {"now", b_now},
                                             {"trim", b_trim}, {NULL, NULL}};
    if (luaL_newmetatable(L, JOB_MT)) {
        lua_newtable(L);
        setfuncs(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, b_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    setfuncs(L, functions);
    lua_pushinteger(L, (lua_Integer)sizeof(bitem));
    lua_setfield(L, -2, "ITEM_SIZE");
    return 1;
}
