/*
 * ticker.c: a small utility library that delivers through bgworker.
 *
 *   local ticker = require "bgworker_ticker"
 *   local t = ticker.start(n, interval_ms, callback)
 *   ...
 *   t:stop()
 *
 * start() runs a POSIX thread that delivers the values 1, 2, ..., n, one
 * every interval_ms, to callback(value) on the Lua thread. The thread ends
 * by itself after n values, when stop() is called, when the ticker is
 * garbage collected, or when bgworker refuses a value because its
 * dispatcher was stopped or its Lua state closed (BGW_CLOSED).
 *
 * Like any utility library it includes bgworker.h only: it does not link
 * against bgworker (nor liblua; the Lua symbols come from the interpreter
 * that loads it). bgworker.core must be loaded in the Lua state first.
 *
 * What it shows:
 *   - the thread holds a handle, acquired on the Lua thread and released by
 *     the thread when it ends;
 *   - each value travels as a small malloc'd struct that bgworker frees with
 *     free() (free_data NULL) on every path;
 *   - Lua references are created and dropped on the Lua thread only;
 *   - the thread never blocks without bound in deliver, because stop() and
 *     __gc join it on the Lua thread, the only thread that makes room in a
 *     bounded queue;
 *   - __gc joins the thread, so closing the Lua state with a ticker running
 *     never leaves this library's code running after it is unloaded.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bgworker.h"

#define TICKER_MT "bgworker_ticker"
/* Registry field of this state's table of running tickers' callbacks, keyed
 * by ticker id. */
#define CALLBACKS_KEY "bgworker_ticker.callbacks"
/* How long one deliver may wait for room in a bounded queue before the
 * thread checks whether stop() asked it to end. */
#define DELIVER_WAIT_MS 50

#if LUA_VERSION_NUM < 502
#define setfuncs(L, l) luaL_register(L, NULL, l)
#else
#define setfuncs(L, l) luaL_setfuncs(L, l, 0)
#endif

/* One value on its way to Lua. It names its ticker by id rather than by
 * pointer or registry reference: it may be decoded after its ticker was
 * stopped and collected, and ids, unlike references, are never reused. */
typedef struct tick {
    int ticker_id;
    int value;
} tick;

typedef struct ticker {
    /* Set by start() before the thread runs; read-only afterwards. */
    bgw_api api; /* a copy: the published table belongs to the Lua state */
    bgw_handle *handle; /* the thread's; it releases it when it ends */
    int id;
    int n;
    int interval_ms;

    pthread_mutex_t lock;
    pthread_cond_t wake; /* signalled by stop() to cut a sleep short */
    int stopping; /* under lock */

    /* Lua thread only. */
    pthread_t thread;
    int running; /* the thread exists and has not been joined */
    int destroyed; /* lock and wake are destroyed (__gc ran) */
} ticker;

/* Ticker ids are process-wide so that they stay unique whichever states
 * and threads call start(). */
static pthread_mutex_t next_id_lock = PTHREAD_MUTEX_INITIALIZER;
static int next_id;

/* ------------------------------------------------------------------ */
/* The ticking thread                                                 */

static int stop_requested(ticker *t)
{
    int stopping;
    pthread_mutex_lock(&t->lock);
    stopping = t->stopping;
    pthread_mutex_unlock(&t->lock);
    return stopping;
}

/* Sleep until `deadline` (CLOCK_MONOTONIC) or stop(). True when stopped. */
static int sleep_until(ticker *t, const struct timespec *deadline)
{
    int stopping;
    pthread_mutex_lock(&t->lock);
    while (!t->stopping && pthread_cond_timedwait(&t->wake, &t->lock, deadline) != ETIMEDOUT) {
    }
    stopping = t->stopping;
    pthread_mutex_unlock(&t->lock);
    return stopping;
}

static int tick_decode(lua_State *L, void *data);

/* Deliver one value. True to go on ticking. */
static int deliver_value(ticker *t, int value)
{
    for (;;) {
        int rc;
        tick *item = malloc(sizeof *item);
        if (item == NULL)
            return 0;
        item->ticker_id = t->id;
        item->value = value;
        /* From here on the item is bgworker's, whatever deliver returns. */
        rc = t->api.deliver(t->handle, tick_decode, item, NULL, DELIVER_WAIT_MS);
        if (rc != BGW_TIMEOUT)
            return rc == BGW_OK; /* BGW_CLOSED: nobody will poll any more */
        /* The bounded queue stayed full; the item was freed. Try again
         * with a new one unless stop() is waiting to join us. */
        if (stop_requested(t))
            return 0;
    }
}

static void *ticker_thread(void *arg)
{
    ticker *t = arg;
    struct timespec deadline;
    int value;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    for (value = 1; value <= t->n; value++) {
        deadline.tv_sec += t->interval_ms / 1000;
        deadline.tv_nsec += (long)(t->interval_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
        if (sleep_until(t, &deadline) || !deliver_value(t, value))
            break;
    }
    t->api.release(t->handle);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* The Lua thread                                                     */

static int ignore_tick(lua_State *L)
{
    (void)L;
    return 0;
}

/* Runs in poll(): push the ticker's callback and the value. A value of a
 * ticker stopped meanwhile gets a function that does nothing, so that no
 * callback runs after stop(). */
static int tick_decode(lua_State *L, void *data)
{
    const tick *item = data;
    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    lua_rawgeti(L, -1, item->ticker_id);
    lua_remove(L, -2);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushcfunction(L, ignore_tick);
        return 1;
    }
    lua_pushinteger(L, item->value);
    return 2;
}

/* Set callbacks[id] to the value on top of the stack, and pop it. */
static void set_callback(lua_State *L, int id)
{
    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    lua_insert(L, -2);
    lua_rawseti(L, -2, id);
    lua_pop(L, 1);
}

/* An integer argument in min..max; Lua 5.1 and 5.2 have no integer type. */
static int check_int(lua_State *L, int arg, const char *name, int min, int max)
{
    lua_Number v = lua_tonumber(L, arg);
    if (lua_type(L, arg) != LUA_TNUMBER || !(v >= min && v <= max) || v != (lua_Number)(int)v)
        return luaL_argerror(L, arg,
                             lua_pushfstring(L, "%s must be an integer in %d..%d", name, min, max));
    return (int)v;
}

/* ticker.start(n, interval_ms, callback) -> ticker */
static int ticker_start(lua_State *L)
{
    int n = check_int(L, 1, "n", 1, INT_MAX);
    int interval_ms = check_int(L, 2, "interval_ms", 0, INT_MAX);
    const bgw_api *api;
    pthread_condattr_t attr;
    ticker *t;
    int rc;

    luaL_argcheck(L, lua_type(L, 3) == LUA_TFUNCTION, 3, "callback must be a function");
    api = bgw_api_get(L);
    if (api == NULL)
        return luaL_error(L, "bgworker_ticker: bgworker.core (API version %d) is not loaded",
                          BGW_API_VERSION);

    t = lua_newuserdata(L, sizeof *t);
    memset(t, 0, sizeof *t);
    t->api = *api;
    t->n = n;
    t->interval_ms = interval_ms;
    /* Deadlines are on the monotonic clock, immune to wall-clock jumps. */
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    rc = pthread_cond_init(&t->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0)
        return luaL_error(L, "bgworker_ticker: pthread_cond_init failed (%d)", rc);
    pthread_mutex_init(&t->lock, NULL);
    /* From here on __gc cleans up whatever else goes wrong. */
    luaL_getmetatable(L, TICKER_MT);
    lua_setmetatable(L, -2);

    t->handle = api->acquire(L);
    if (t->handle == NULL)
        return luaL_error(L, "bgworker_ticker: this Lua state's bgworker instance is closed");
    pthread_mutex_lock(&next_id_lock);
    t->id = ++next_id;
    pthread_mutex_unlock(&next_id_lock);
    lua_pushvalue(L, 3);
    set_callback(L, t->id);

    rc = pthread_create(&t->thread, NULL, ticker_thread, t);
    if (rc != 0) {
        api->release(t->handle);
        lua_pushnil(L);
        set_callback(L, t->id);
        return luaL_error(L, "bgworker_ticker: pthread_create failed (%d)", rc);
    }
    t->running = 1;
    return 1;
}

/* ticker:stop(): stop ticking and wait for the thread to end. No callback
 * runs afterwards, even for values already queued. */
static int ticker_stop(lua_State *L)
{
    ticker *t = luaL_checkudata(L, 1, TICKER_MT);
    if (t->running) {
        pthread_mutex_lock(&t->lock);
        t->stopping = 1;
        pthread_cond_signal(&t->wake);
        pthread_mutex_unlock(&t->lock);
        pthread_join(t->thread, NULL);
        t->running = 0;
        lua_pushnil(L);
        set_callback(L, t->id);
    }
    return 0;
}

/* Also runs for every ticker when the Lua state is closed, before this
 * library is unloaded. */
static int ticker_gc(lua_State *L)
{
    ticker *t = luaL_checkudata(L, 1, TICKER_MT);
    ticker_stop(L);
    if (!t->destroyed) {
        pthread_cond_destroy(&t->wake);
        pthread_mutex_destroy(&t->lock);
        t->destroyed = 1;
    }
    return 0;
}

int luaopen_bgworker_ticker(lua_State *L)
{
    static const luaL_Reg methods[] = {{"stop", ticker_stop}, {NULL, NULL}};
    static const luaL_Reg functions[] = {{"start", ticker_start}, {NULL, NULL}};

    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    if (lua_isnil(L, -1)) {
        lua_newtable(L);
        lua_setfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    }
    lua_pop(L, 1);

    if (luaL_newmetatable(L, TICKER_MT)) {
        lua_newtable(L);
        setfuncs(L, methods);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, ticker_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);

    lua_newtable(L);
    setfuncs(L, functions);
    return 1;
}
