/*
 * testutil.c: module bgworker_testutil, a utility library that exists to
 * check the promises of bgworker.core (spec/core_spec.lua). Like any utility
 * library it includes bgworker.h only and links against neither bgworker nor
 * liblua.
 *
 * Items are counted in process-wide counters. An item freed by
 * testutil's own free_data is poisoned and kept in a graveyard until
 * reset(), instead of being returned to malloc: so a second free or a decode
 * after the free reads a dead magic word, not reused memory, and is counted
 * exactly.
 *
 * Lua API (job ids are process-wide: a job started in one Lua state can be
 * joined from another, also after the first was closed)
 *
 *   testutil.produce(opts) -> job
 *     Start opts.producers threads (default 1). Producer p (1..producers)
 *     delivers opts.items items (default 1) with seq = 1, 2, ... in order.
 *     If opts.until_closed = k > 0, it then goes on delivering one item per
 *     millisecond until k delivers returned BGW_CLOSED (giving up after
 *     10000 more). Each producer holds its own handle, acquired here and
 *     released by the thread when it ends, so it may outlive the Lua state.
 *     All producers start together once all exist.
 *       opts.callback     function; a decoded item calls callback(p, seq, ok),
 *                         ok telling whether the payload checksum matched.
 *                         Required for decode "normal".
 *       opts.decode       "normal" (default); "raise": decode raises an
 *                         error; "nofunc": pushes p and seq, no function;
 *                         "nothing": pushes nothing; "null": decode is NULL.
 *       opts.free         "counting" (default): testutil's free_data;
 *                         "libc": free_data NULL, so the core calls free().
 *                         Such items are not in allocated/freed (free() cannot
 *                         be observed): count decodes, and use valgrind.
 *                         "copy": the item is built on the producer's stack
 *                         and delivered with bgw_api.deliver_copy (nothing to
 *                         free; not in allocated/freed either).
 *       opts.copy_len     for "copy": the len passed (default: the item's
 *                         size); the bytes past the item are zeros.
 *       opts.timeout      timeout_ms of each deliver (default FOREVER).
 *       opts.payload      items carry 0..payload random bytes (default 0).
 *       opts.null_handle  true: deliver with a NULL handle.
 *       opts.handle       a handle from testutil.acquire(): every producer
 *                         delivers with it, and none releases it.
 *   testutil.call(opts) -> job
 *     Start one thread that makes one round trip with bgw_api.call. Its
 *     decode pushes opts.callback, job, 1, true; its result copies up to 8
 *     return values (nil, boolean, number, string < 64 bytes) into a struct
 *     on the calling thread's stack.
 *       opts.callback, opts.decode, opts.free, opts.timeout: as for produce.
 *       opts.result       "copy" (default); "raise": result raises an error;
 *                         "null": result is NULL.
 *   testutil.done(job) -> boolean: all the job's threads have finished.
 *   testutil.stop(job): the job's producers deliver no more items after the
 *     one each is delivering (nor linger for until_closed).
 *   testutil.join(job) -> table
 *     Wait for the job's threads and forget the job. For produce: the
 *     number of delivers that returned each code, keyed by name
 *     ({BGW_OK = n, BGW_FULL = n, ..., other = n}, all present). For call:
 *     {code = name, n = number of values copied, values...}.
 *   testutil.counters() -> {allocated, freed, double_frees, stale_decodes,
 *     decodes, results}: items allocated (counting ones), freed by
 *     testutil's free_data, frees of an item that was not live, decodes or
 *     results that ran on an item already freed, decodes run, results run.
 *   testutil.reset()
 *     Zero the counters, free the graveyard, and forget the callbacks of
 *     this state. Only while no job runs and no item is queued anywhere.
 *   testutil.bury()
 *     Free the graveyard's items for good, keeping the counters: for long
 *     runs. A second free of a buried item is no longer caught.
 *   testutil.fresh_state(code) -> true, values... | false, message
 *     Run the Lua chunk `code` in a new Lua state with the standard
 *     libraries and the caller's package.path and package.cpath, then close
 *     that state. Returns the chunk's values (nil, booleans, numbers,
 *     strings) or its error.
 *   testutil.strerror(code) -> bgw_api.strerror(code)
 *   testutil.set_capacity(n) -> the name of bgw_api.set_capacity(L, n)'s code;
 *     n is converted to size_t as C converts it: -1 is SIZE_MAX.
 *   testutil.acquire() -> handle (a light userdata): bgw_api.acquire(L),
 *     held until testutil.release(handle). Handles are plain pointers:
 *     releasing one twice, or producing with it after its release, is the
 *     caller misuse that bgworker reports and refuses.
 *   testutil.release(handle): bgw_api.release(handle).
 *   testutil.fork() -> pid in the parent, 0 in the child (raises on failure).
 *   testutil.waitpid(pid, timeout) -> the child's exit status (128 + signal
 *     when killed), or nil if it is still running after `timeout` seconds.
 *   testutil.kill(pid): SIGKILL the child and reap it.
 *   testutil._exit(status): end this process at once, running no atexit
 *     handler and closing no Lua state.
 *   testutil.fd_open(fd) -> whether descriptor fd is open in this process.
 *   testutil.sigurg(action) -> count: set SIGURG's disposition as an
 *     application would: "ignore" (SIG_IGN), "default" (SIG_DFL), "count"
 *     (a handler that counts the signals it gets) or "chain" (one that
 *     counts them and passes them on to the handler it replaced); "raise"
 *     sends SIGURG to the calling thread. Returns how many the counting
 *     handlers got so far.
 *   testutil.api() -> {version, size, client_size}: the published table's
 *     version and size, and sizeof(bgw_api) in this build.
 *   testutil.NOWAIT, testutil.FOREVER: BGW_NOWAIT, BGW_FOREVER.
 */
#define _POSIX_C_SOURCE 200809L

#include <limits.h>
#include <pthread.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bgworker.h"

#include <lualib.h>

#if LUA_VERSION_NUM < 502
#define setfuncs(L, l) luaL_register(L, NULL, l)
#else
#define setfuncs(L, l) luaL_setfuncs(L, l, 0)
#endif

/* Registry field: this state's table of job callbacks (luaL_ref keys, never
 * unref'd, so never reused until reset() replaces the table). */
#define CALLBACKS_KEY "bgworker_testutil.callbacks"
#define ITEM_LIVE 0x4c495645u
#define ITEM_DEAD 0x44454144u
#define MAX_VALUES 8
#define MAX_STRING 64
#define MAX_LINGER 10000
/* Return codes counted by name; one more slot for anything else. */
#define NCODES (BGW_ERROR + 1)

static const char *const code_names[NCODES + 1] = {
    "BGW_OK", "BGW_FULL", "BGW_CLOSED", "BGW_TIMEOUT", "BGW_INVALID", "BGW_CANCELLED", "BGW_ERROR",
    "other"};

static int code_index(int code)
{
    return code >= 0 && code < NCODES ? code : NCODES;
}

/* ------------------------------------------------------------------ */
/* Counters and items                                                 */

static struct {
    atomic_long allocated, freed, double_frees, stale_decodes, decodes, results;
} counters;

typedef struct value {
    int type;
    lua_Number number; /* LUA_TNUMBER, and LUA_TBOOLEAN as 0 or 1 */
    size_t len;
    char string[MAX_STRING];
} value;

/* What result copies for the thread waiting in call. */
typedef struct reply {
    int n;
    value values[MAX_VALUES];
} reply;

typedef struct item {
    atomic_uint magic; /* ITEM_LIVE until freed, then ITEM_DEAD */
    int producer;
    long seq;
    int callback; /* key in the state's callbacks table */
    reply *reply; /* call only: on the waiting thread's stack */
    struct item *next_dead;
    unsigned checksum;
    size_t size;
    unsigned char payload[];
} item;

static pthread_mutex_t graveyard_lock = PTHREAD_MUTEX_INITIALIZER;
static item *graveyard;

static unsigned fnv1a(const unsigned char *p, size_t n)
{
    unsigned h = 2166136261u;
    while (n--)
        h = (h ^ *p++) * 16777619u;
    return h;
}

static unsigned xorshift(unsigned *state)
{
    unsigned x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *state = x;
}

static void free_counting(void *data)
{
    item *it = data;
    if (atomic_exchange(&it->magic, ITEM_DEAD) != ITEM_LIVE) {
        atomic_fetch_add(&counters.double_frees, 1);
        return;
    }
    atomic_fetch_add(&counters.freed, 1);
    pthread_mutex_lock(&graveyard_lock);
    it->next_dead = graveyard;
    graveyard = it;
    pthread_mutex_unlock(&graveyard_lock);
}

/* Count a decode or result on `data`; raise if it was freed already. */
static item *live_item(lua_State *L, void *data, atomic_long *counter)
{
    item *it = data;
    atomic_fetch_add(counter, 1);
    if (atomic_load(&it->magic) != ITEM_LIVE) {
        atomic_fetch_add(&counters.stale_decodes, 1);
        luaL_error(L, "testutil: item used after it was freed");
    }
    return it;
}

static int decode_normal(lua_State *L, void *data)
{
    const item *it = live_item(L, data, &counters.decodes);
    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    lua_rawgeti(L, -1, it->callback);
    lua_remove(L, -2);
    lua_pushinteger(L, it->producer);
    lua_pushinteger(L, it->seq);
    lua_pushboolean(L, fnv1a(it->payload, it->size) == it->checksum);
    return 4;
}

static int decode_raise(lua_State *L, void *data)
{
    const item *it = live_item(L, data, &counters.decodes);
    return luaL_error(L, "testutil decode raised (producer %d, seq %d)", it->producer,
                      (int)it->seq);
}

static int decode_nofunc(lua_State *L, void *data)
{
    const item *it = live_item(L, data, &counters.decodes);
    lua_pushinteger(L, it->producer);
    lua_pushinteger(L, it->seq);
    return 2;
}

static int decode_nothing(lua_State *L, void *data)
{
    live_item(L, data, &counters.decodes);
    return 0;
}

/* The callback's nresults values are the top of L's stack. */
static void result_copy(lua_State *L, void *data, int nresults)
{
    reply *r = live_item(L, data, &counters.results)->reply;
    int base = lua_gettop(L) - nresults + 1, i;
    if (nresults > MAX_VALUES)
        luaL_error(L, "testutil: more than %d results", MAX_VALUES);
    for (i = 0; i < nresults; i++) {
        value *v = &r->values[i];
        const char *s;
        v->type = lua_type(L, base + i);
        switch (v->type) {
        case LUA_TNIL:
            break;
        case LUA_TBOOLEAN:
            v->number = lua_toboolean(L, base + i);
            break;
        case LUA_TNUMBER:
            v->number = lua_tonumber(L, base + i);
            break;
        case LUA_TSTRING:
            s = lua_tolstring(L, base + i, &v->len);
            if (v->len >= MAX_STRING)
                luaL_error(L, "testutil: result %d is longer than %d bytes", i + 1, MAX_STRING - 1);
            memcpy(v->string, s, v->len);
            break;
        default:
            luaL_error(L, "testutil: cannot copy a %s result", lua_typename(L, v->type));
        }
    }
    r->n = nresults;
}

static void result_raise(lua_State *L, void *data, int nresults)
{
    (void)nresults;
    live_item(L, data, &counters.results);
    luaL_error(L, "testutil result raised");
}

/* ------------------------------------------------------------------ */
/* Jobs                                                               */

typedef struct job job;

typedef struct worker {
    job *job;
    int id; /* 1-based producer id; the job id for a call */
    bgw_handle *handle; /* the thread's; it releases it when it ends, unless held */
    pthread_t thread;
    unsigned rng;
    long counts[NCODES + 1];
} worker;

enum gate { GATE_CLOSED, GATE_OPEN, GATE_CANCELLED };

struct job {
    int id;
    job *next; /* in the job list */
    int is_call;
    bgw_api api; /* a copy: the published table belongs to the Lua state */
    bgw_decode_fn decode;
    bgw_result_fn result;
    bgw_free_fn free_data;
    int callback;
    long items;
    int until_closed;
    int timeout_ms;
    size_t payload;
    int copy; /* deliver with deliver_copy */
    long copy_len; /* its len, or -1: the item's size */
    int held; /* the workers use a handle from testutil.acquire(): not theirs to release */
    long interval_ms; /* a pause before each item */

    /* Threads wait here until all of them exist: either all run or none. */
    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    enum gate gate;
    atomic_int running; /* threads not yet finished */
    atomic_int stopping; /* testutil.stop(): producers deliver no more */

    int code; /* call: what call returned */
    reply reply; /* call: copied from the thread's stack after call */

    int nworkers;
    worker workers[];
};

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static job *jobs;
static int last_job_id;

/* The size of the next item's payload. */
static size_t payload_size(worker *w)
{
    const job *j = w->job;
    return j->payload ? xorshift(&w->rng) % (j->payload + 1) : 0;
}

/* Fill `it`, which has room for `size` payload bytes. */
static void fill_item(worker *w, long seq, item *it, size_t size)
{
    const job *j = w->job;
    size_t i;
    memset(it, 0, sizeof *it);
    atomic_init(&it->magic, ITEM_LIVE);
    it->producer = w->id;
    it->seq = seq;
    it->callback = j->callback;
    it->size = size;
    for (i = 0; i < size; i++)
        it->payload[i] = (unsigned char)xorshift(&w->rng);
    it->checksum = fnv1a(it->payload, size);
}

static item *new_item(worker *w, long seq)
{
    const job *j = w->job;
    size_t size = payload_size(w);
    item *it = malloc(sizeof *it + size);
    if (it == NULL) {
        fputs("bgworker_testutil: out of memory\n", stderr);
        abort();
    }
    fill_item(w, seq, it, size);
    if (j->free_data != NULL)
        atomic_fetch_add(&counters.allocated, 1);
    return it;
}

/* Deliver item `seq` by copy, from this stack frame. */
static int deliver_copied(worker *w, long seq)
{
    const job *j = w->job;
    union {
        item it;
        max_align_t align;
        unsigned char bytes[2 * BGW_COPY_MAX];
    } record;
    size_t size = payload_size(w);
    memset(&record, 0, sizeof record);
    fill_item(w, seq, &record.it, size);
    return j->api.deliver_copy(w->handle, j->decode, &record,
                               j->copy_len >= 0 ? (size_t)j->copy_len : sizeof record.it + size,
                               j->timeout_ms);
}

static int deliver_one(worker *w, long seq)
{
    const job *j = w->job;
    int code = j->copy ? deliver_copied(w, seq)
                       : j->api.deliver(w->handle, j->decode, new_item(w, seq), j->free_data,
                                        j->timeout_ms);
    w->counts[code_index(code)]++;
    return code;
}

static void produce(worker *w)
{
    job *j = w->job;
    struct timespec ms = {0, 1000000L};
    long seq, extra;
    int closed = 0;
    struct timespec interval = {j->interval_ms / 1000, (j->interval_ms % 1000) * 1000000L};
    for (seq = 1; seq <= j->items && !atomic_load_explicit(&j->stopping, memory_order_relaxed); seq++) {
        if (j->interval_ms > 0)
            nanosleep(&interval, NULL);
        deliver_one(w, seq);
    }
    for (extra = 0; closed < j->until_closed && extra < MAX_LINGER && !atomic_load(&j->stopping); extra++) {
        nanosleep(&ms, NULL);
        closed += deliver_one(w, seq++) == BGW_CLOSED;
    }
}

static void call(worker *w)
{
    job *j = w->job;
    reply r;
    item *it = new_item(w, 1);
    r.n = 0;
    it->reply = &r;
    j->code = j->api.call(w->handle, j->decode, j->result, it, j->free_data, j->timeout_ms);
    /* call returned: result will not touch r again, and `it` may be gone. */
    j->reply = r;
}

static void *worker_thread(void *arg)
{
    worker *w = arg;
    job *j = w->job;
    enum gate gate;
    pthread_mutex_lock(&j->gate_lock);
    while (j->gate == GATE_CLOSED)
        pthread_cond_wait(&j->gate_cond, &j->gate_lock);
    gate = j->gate;
    pthread_mutex_unlock(&j->gate_lock);
    if (gate == GATE_OPEN) {
        if (j->is_call)
            call(w);
        else
            produce(w);
    }
    if (!j->held)
        j->api.release(w->handle);
    atomic_fetch_sub(&j->running, 1);
    return NULL;
}

static void open_gate(job *j, enum gate gate)
{
    pthread_mutex_lock(&j->gate_lock);
    j->gate = gate;
    pthread_cond_broadcast(&j->gate_cond);
    pthread_mutex_unlock(&j->gate_lock);
}

static void free_job(job *j)
{
    pthread_cond_destroy(&j->gate_cond);
    pthread_mutex_destroy(&j->gate_lock);
    free(j);
}

/* opts.name as an integer in min..max, or def when absent. */
static long opt_int(lua_State *L, const char *name, long def, long min, long max)
{
    lua_Number v;
    lua_getfield(L, 1, name);
    v = lua_tonumber(L, -1);
    if (lua_isnil(L, -1))
        v = (lua_Number)def;
    else if (lua_type(L, -1) != LUA_TNUMBER || !(v >= min && v <= max) || v != (lua_Number)(long)v)
        luaL_error(L, "testutil: opts.%s is not an integer or out of range", name);
    lua_pop(L, 1);
    return (long)v;
}

/* Index in `names` of opts.name, or 0 when absent. */
static int opt_choice(lua_State *L, const char *name, const char *const names[])
{
    const char *s;
    int i;
    lua_getfield(L, 1, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    s = lua_tostring(L, -1);
    for (i = 0; s != NULL && names[i] != NULL; i++)
        if (strcmp(s, names[i]) == 0) {
            lua_pop(L, 1);
            return i;
        }
    return luaL_error(L, "testutil: bad opts.%s", name);
}

/* Parse opts (argument 1), start the job's threads, and push its id. */
static int start_job(lua_State *L, int is_call)
{
    static const char *const decodes[] = {"normal", "raise", "nofunc", "nothing", "null", NULL};
    static const bgw_decode_fn decode_fns[] = {decode_normal, decode_raise, decode_nofunc,
                                               decode_nothing, NULL};
    static const char *const frees[] = {"counting", "libc", "copy", NULL};
    static const char *const results[] = {"copy", "raise", "null", NULL};
    static const bgw_result_fn result_fns[] = {result_copy, result_raise, NULL};
    const bgw_api *api = bgw_api_get(L);
    job opts, *j;
    int decode, free_kind, null_handle, unref, i, created;
    bgw_handle *held;

    luaL_checktype(L, 1, LUA_TTABLE);
    if (api == NULL)
        return luaL_error(L, "testutil: bgworker.core is not loaded");
    /* All that may raise comes before anything is allocated. */
    memset(&opts, 0, sizeof opts);
    opts.is_call = is_call;
    opts.api = *api;
    opts.nworkers = is_call ? 1 : (int)opt_int(L, "producers", 1, 1, 64);
    opts.items = is_call ? 1 : opt_int(L, "items", 1, 0, LONG_MAX / 2);
    opts.until_closed = (int)opt_int(L, "until_closed", 0, 0, INT_MAX);
    opts.timeout_ms = (int)opt_int(L, "timeout", BGW_FOREVER, BGW_FOREVER, INT_MAX);
    opts.payload = (size_t)opt_int(L, "payload", 0, 0, 1 << 20);
    opts.interval_ms = opt_int(L, "interval_ms", 0, 0, 60000);
    decode = opt_choice(L, "decode", decodes);
    opts.decode = decode_fns[decode];
    free_kind = opt_choice(L, "free", frees);
    opts.free_data = free_kind == 0 ? free_counting : NULL;
    opts.copy = free_kind == 2;
    opts.copy_len = opt_int(L, "copy_len", -1, -1, 2 * BGW_COPY_MAX);
    if (opts.copy && (is_call || sizeof(item) + opts.payload > 2 * BGW_COPY_MAX))
        return luaL_error(L, "testutil: opts.free \"copy\" is for produce, with a smaller payload");
    opts.result = result_fns[opt_choice(L, "result", results)];
    lua_getfield(L, 1, "null_handle");
    null_handle = lua_toboolean(L, -1);
    /* opts.unref: the workers' own handles do not keep the loop alive. */
    lua_getfield(L, 1, "unref");
    unref = lua_toboolean(L, -1);
    lua_pop(L, 2);
    lua_getfield(L, 1, "handle");
    if (!lua_isnil(L, -1) && lua_type(L, -1) != LUA_TLIGHTUSERDATA)
        return luaL_error(L, "testutil: opts.handle must come from testutil.acquire()");
    held = (bgw_handle *)lua_touserdata(L, -1);
    opts.held = held != NULL;
    lua_pop(L, 1);
    lua_getfield(L, 1, "callback");
    if (decode == 0 && lua_type(L, -1) != LUA_TFUNCTION)
        return luaL_error(L, "testutil: opts.callback must be a function");
    j = calloc(1, sizeof *j + (size_t)opts.nworkers * sizeof(worker));
    if (j == NULL)
        return luaL_error(L, "testutil: out of memory");
    *j = opts;
    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    lua_insert(L, -2);
    j->callback = luaL_ref(L, -2);

    pthread_mutex_init(&j->gate_lock, NULL);
    pthread_cond_init(&j->gate_cond, NULL);
    atomic_init(&j->running, j->nworkers);
    atomic_init(&j->stopping, 0);
    pthread_mutex_lock(&jobs_lock);
    j->id = ++last_job_id;
    pthread_mutex_unlock(&jobs_lock);
    for (i = 0; i < j->nworkers; i++) {
        worker *w = &j->workers[i];
        w->job = j;
        w->id = is_call ? j->id : i + 1;
        w->rng = 2654435761u * (unsigned)(i + 1);
        w->handle = null_handle ? NULL : held != NULL ? held : api->acquire(L);
        if (unref && held == NULL && w->handle != NULL)
            api->unref(L, w->handle);
    }
    for (created = 0; created < j->nworkers; created++)
        if (pthread_create(&j->workers[created].thread, NULL, worker_thread, &j->workers[created]))
            break;
    if (created < j->nworkers) {
        open_gate(j, GATE_CANCELLED);
        for (i = 0; i < j->nworkers; i++)
            if (i < created)
                pthread_join(j->workers[i].thread, NULL);
            else if (!j->held)
                api->release(j->workers[i].handle);
        free_job(j);
        return luaL_error(L, "testutil: pthread_create failed");
    }
    pthread_mutex_lock(&jobs_lock);
    j->next = jobs;
    jobs = j;
    pthread_mutex_unlock(&jobs_lock);
    open_gate(j, GATE_OPEN);
    lua_pushinteger(L, j->id);
    return 1;
}

static int tu_produce(lua_State *L)
{
    return start_job(L, 0);
}

static int tu_call(lua_State *L)
{
    return start_job(L, 1);
}

/* The job with the id at argument 1; unlinked from the list if `unlink`. */
static job *find_job(lua_State *L, int unlink)
{
    lua_Integer id = luaL_checkinteger(L, 1);
    job **p, *j;
    pthread_mutex_lock(&jobs_lock);
    for (p = &jobs; *p != NULL && (*p)->id != id; p = &(*p)->next) {
    }
    j = *p;
    if (j != NULL && unlink)
        *p = j->next;
    pthread_mutex_unlock(&jobs_lock);
    if (j == NULL)
        luaL_argerror(L, 1, "no such job");
    return j;
}

static int tu_stop(lua_State *L)
{
    atomic_store(&find_job(L, 0)->stopping, 1);
    return 0;
}

static int tu_done(lua_State *L)
{
    lua_pushboolean(L, atomic_load(&find_job(L, 0)->running) == 0);
    return 1;
}

static void push_value(lua_State *L, const value *v)
{
    switch (v->type) {
    case LUA_TBOOLEAN:
        lua_pushboolean(L, v->number != 0);
        break;
    case LUA_TNUMBER:
        lua_pushnumber(L, v->number);
        break;
    case LUA_TSTRING:
        lua_pushlstring(L, v->string, v->len);
        break;
    default:
        lua_pushnil(L);
    }
}

static int tu_join(lua_State *L)
{
    job *j = find_job(L, 1);
    int i, c;
    for (i = 0; i < j->nworkers; i++)
        pthread_join(j->workers[i].thread, NULL);
    lua_newtable(L);
    if (j->is_call) {
        lua_pushstring(L, code_names[code_index(j->code)]);
        lua_setfield(L, -2, "code");
        lua_pushinteger(L, j->reply.n);
        lua_setfield(L, -2, "n");
        for (i = 0; i < j->reply.n; i++) {
            push_value(L, &j->reply.values[i]);
            lua_rawseti(L, -2, i + 1);
        }
    } else {
        for (c = 0; c <= NCODES; c++) {
            long total = 0;
            for (i = 0; i < j->nworkers; i++)
                total += j->workers[i].counts[c];
            lua_pushinteger(L, total);
            lua_setfield(L, -2, code_names[c]);
        }
    }
    free_job(j);
    return 1;
}

/* ------------------------------------------------------------------ */
/* Counters, states, the API table                                    */

static int tu_counters(lua_State *L)
{
    lua_newtable(L);
#define FIELD(name)                                                                                \
    lua_pushnumber(L, (lua_Number)atomic_load(&counters.name));                                   \
    lua_setfield(L, -2, #name)
    FIELD(allocated);
    FIELD(freed);
    FIELD(double_frees);
    FIELD(stale_decodes);
    FIELD(decodes);
    FIELD(results);
#undef FIELD
    return 1;
}

static int tu_bury(lua_State *L)
{
    item *dead;
    (void)L;
    pthread_mutex_lock(&graveyard_lock);
    dead = graveyard;
    graveyard = NULL;
    pthread_mutex_unlock(&graveyard_lock);
    while (dead != NULL) {
        item *next = dead->next_dead;
        free(dead);
        dead = next;
    }
    return 0;
}

/* The library is unloaded when its Lua state closes, and the graveyard's head
 * with it: free the items it still holds, which nothing else references. */
__attribute__((destructor)) static void bury_at_unload(void)
{
    tu_bury(NULL);
}

static int tu_reset(lua_State *L)
{
    atomic_store(&counters.allocated, 0);
    atomic_store(&counters.freed, 0);
    atomic_store(&counters.double_frees, 0);
    atomic_store(&counters.stale_decodes, 0);
    atomic_store(&counters.decodes, 0);
    atomic_store(&counters.results, 0);
    tu_bury(L);
    lua_newtable(L);
    lua_setfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    return 0;
}

static void copy_package_field(lua_State *from, lua_State *to, const char *name)
{
    lua_getglobal(from, "package");
    lua_getfield(from, -1, name);
    lua_getglobal(to, "package");
    lua_pushstring(to, lua_tostring(from, -1));
    lua_setfield(to, -2, name);
    lua_pop(to, 1);
    lua_pop(from, 2);
}

static int tu_fresh_state(lua_State *L)
{
    size_t len;
    const char *code = luaL_checklstring(L, 1, &len);
    lua_State *S = luaL_newstate();
    const char *s;
    int ok, n, i;
    if (S == NULL)
        return luaL_error(L, "testutil: cannot create a Lua state");
    luaL_openlibs(S);
    copy_package_field(L, S, "path");
    copy_package_field(L, S, "cpath");
    ok = luaL_loadbuffer(S, code, len, "=fresh_state") == 0 && lua_pcall(S, 0, LUA_MULTRET, 0) == 0;
    n = lua_gettop(S);
    for (i = 1; ok && i <= n; i++) {
        int t = lua_type(S, i);
        if (t != LUA_TNIL && t != LUA_TBOOLEAN && t != LUA_TNUMBER && t != LUA_TSTRING) {
            lua_pushfstring(S, "fresh_state: cannot return a %s", lua_typename(S, t));
            ok = 0;
        }
    }
    if (ok && !lua_checkstack(L, n + 1)) {
        lua_pushliteral(S, "fresh_state: too many results");
        ok = 0;
    }
    if (!ok) {
        lua_pushboolean(L, 0);
        lua_pushstring(L, lua_isstring(S, -1) ? lua_tostring(S, -1) : "(error object is not a string)");
        n = 2;
    } else {
        lua_pushboolean(L, 1);
        for (i = 1; i <= n; i++)
            switch (lua_type(S, i)) {
            case LUA_TBOOLEAN:
                lua_pushboolean(L, lua_toboolean(S, i));
                break;
            case LUA_TNUMBER:
#if LUA_VERSION_NUM >= 503
                if (lua_isinteger(S, i)) {
                    lua_pushinteger(L, lua_tointeger(S, i));
                    break;
                }
#endif
                lua_pushnumber(L, lua_tonumber(S, i));
                break;
            case LUA_TSTRING:
                s = lua_tolstring(S, i, &len);
                lua_pushlstring(L, s, len);
                break;
            default:
                lua_pushnil(L);
            }
        n++;
    }
    lua_close(S);
    return n;
}

static const bgw_api *checked_api(lua_State *L)
{
    const bgw_api *api = bgw_api_get(L);
    if (api == NULL)
        luaL_error(L, "testutil: bgworker.core is not loaded");
    return api;
}

static int tu_strerror(lua_State *L)
{
    lua_pushstring(L, checked_api(L)->strerror((int)luaL_checkinteger(L, 1)));
    return 1;
}

static int tu_set_capacity(lua_State *L)
{
    lua_Integer capacity = luaL_checkinteger(L, 1);
    lua_pushstring(L, checked_api(L)->strerror(checked_api(L)->set_capacity(L, (size_t)capacity)));
    return 1;
}

static int tu_acquire(lua_State *L)
{
    bgw_handle *handle = checked_api(L)->acquire(L);
    if (handle == NULL)
        return luaL_error(L, "testutil: bgw_api.acquire returned NULL");
    lua_pushlightuserdata(L, handle);
    return 1;
}

/* ref(handle) and unref(handle): bgw_api's return code. */
static int tu_ref(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TLIGHTUSERDATA);
    lua_pushinteger(L, checked_api(L)->ref(L, (bgw_handle *)lua_touserdata(L, 1)));
    return 1;
}

static int tu_unref(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TLIGHTUSERDATA);
    lua_pushinteger(L, checked_api(L)->unref(L, (bgw_handle *)lua_touserdata(L, 1)));
    return 1;
}

static int tu_release(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TLIGHTUSERDATA);
    checked_api(L)->release((bgw_handle *)lua_touserdata(L, 1));
    return 0;
}

/* ------------------------------------------------------------------ */
/* Processes                                                          */

static int tu_fork(lua_State *L)
{
    pid_t pid = fork();
    if (pid < 0)
        return luaL_error(L, "testutil: fork failed");
    lua_pushinteger(L, pid);
    return 1;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int tu_waitpid(lua_State *L)
{
    pid_t pid = (pid_t)luaL_checkinteger(L, 1);
    double deadline = now() + luaL_checknumber(L, 2);
    struct timespec ms = {0, 1000000L};
    int status;
    for (;;) {
        pid_t got = waitpid(pid, &status, WNOHANG);
        if (got == pid) {
            lua_pushinteger(L, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
            return 1;
        }
        if (got < 0)
            return luaL_error(L, "testutil: waitpid(%d) failed", (int)pid);
        if (now() > deadline) {
            lua_pushnil(L);
            return 1;
        }
        nanosleep(&ms, NULL);
    }
}

static int tu_kill(lua_State *L)
{
    pid_t pid = (pid_t)luaL_checkinteger(L, 1);
    int status;
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return 0;
}

static int tu_exit(lua_State *L)
{
    _exit((int)luaL_checkinteger(L, 1));
}

static int tu_fd_open(lua_State *L)
{
    lua_pushboolean(L, fcntl((int)luaL_checkinteger(L, 1), F_GETFD) != -1);
    return 1;
}

/* ------------------------------------------------------------------ */
/* SIGURG, which bgworker.pool uses to interrupt its workers           */

static atomic_long sigurg_count;
/* What "chain" replaced. */
static struct sigaction sigurg_replaced;

static void count_sigurg(int signal)
{
    (void)signal;
    atomic_fetch_add(&sigurg_count, 1);
}

static void chain_sigurg(int signal, siginfo_t *info, void *context)
{
    atomic_fetch_add(&sigurg_count, 1);
    if (sigurg_replaced.sa_flags & SA_SIGINFO)
        sigurg_replaced.sa_sigaction(signal, info, context);
    else if (sigurg_replaced.sa_handler != SIG_DFL && sigurg_replaced.sa_handler != SIG_IGN)
        sigurg_replaced.sa_handler(signal);
}

static int tu_sigurg(lua_State *L)
{
    static const char *const actions[] = {"ignore", "default", "count", "chain", "raise", NULL};
    int action = luaL_checkoption(L, 1, NULL, actions);
    if (action == 4) {
        raise(SIGURG);
    } else {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sigemptyset(&sa.sa_mask);
        if (action == 3) {
            sa.sa_sigaction = chain_sigurg;
            sa.sa_flags = SA_SIGINFO;
        } else {
            sa.sa_handler = action == 0 ? SIG_IGN : action == 1 ? SIG_DFL : count_sigurg;
        }
        if (sigaction(SIGURG, &sa, action == 3 ? &sigurg_replaced : NULL) != 0)
            return luaL_error(L, "testutil: sigaction(SIGURG) failed");
    }
    lua_pushinteger(L, (lua_Integer)atomic_load(&sigurg_count));
    return 1;
}

/* A child forked while one of our locks was held would find it held for
 * good: take them around fork(), as a utility library should. */
static void lock_all(void)
{
    pthread_mutex_lock(&jobs_lock);
    pthread_mutex_lock(&graveyard_lock);
}

static void unlock_all(void)
{
    pthread_mutex_unlock(&graveyard_lock);
    pthread_mutex_unlock(&jobs_lock);
}

static int tu_api(lua_State *L)
{
    const bgw_api *api = checked_api(L);
    lua_newtable(L);
    lua_pushinteger(L, (lua_Integer)api->version);
    lua_setfield(L, -2, "version");
    lua_pushinteger(L, (lua_Integer)api->size);
    lua_setfield(L, -2, "size");
    lua_pushinteger(L, (lua_Integer)sizeof(bgw_api));
    lua_setfield(L, -2, "client_size");
    return 1;
}

int luaopen_bgworker_testutil(lua_State *L)
{
    static const luaL_Reg functions[] = {
        {"produce", tu_produce},
        {"call", tu_call},
        {"done", tu_done},
        {"stop", tu_stop},
        {"join", tu_join},
        {"counters", tu_counters},
        {"reset", tu_reset},
        {"bury", tu_bury},
        {"fresh_state", tu_fresh_state},
        {"strerror", tu_strerror},
        {"set_capacity", tu_set_capacity},
        {"api", tu_api},
        {"acquire", tu_acquire},
        {"release", tu_release},
        {"ref", tu_ref},
        {"unref", tu_unref},
        {"fork", tu_fork},
        {"waitpid", tu_waitpid},
        {"kill", tu_kill},
        {"_exit", tu_exit},
        {"fd_open", tu_fd_open},
        {"sigurg", tu_sigurg},
        {NULL, NULL},
    };
    static atomic_flag fork_handlers = ATOMIC_FLAG_INIT;
    if (!atomic_flag_test_and_set(&fork_handlers))
        pthread_atfork(lock_all, unlock_all, unlock_all);
    lua_getfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    if (lua_isnil(L, -1)) {
        lua_newtable(L);
        lua_setfield(L, LUA_REGISTRYINDEX, CALLBACKS_KEY);
    }
    lua_pop(L, 1);
    lua_newtable(L);
    setfuncs(L, functions);
    lua_pushinteger(L, BGW_NOWAIT);
    lua_setfield(L, -2, "NOWAIT");
    lua_pushinteger(L, BGW_FOREVER);
    lua_setfield(L, -2, "FOREVER");
    return 1;
}
