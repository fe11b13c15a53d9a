/*
 * bgworker.h: the C contract between the bgworker helper and utility libraries.
 *
 * A utility library is any native library whose background threads hand
 * results to a Lua state. It includes this header only: it never links
 * against bgworker. Opening `bgworker.core` in a Lua state publishes a
 * `bgw_api` table of function pointers in that state's registry;
 * `bgw_api_get` fetches and checks it.
 *
 * Threads
 *   Functions marked (Lua thread) may only be called on the thread that runs
 *   the Lua state, with a valid `lua_State *`. Functions marked (any thread)
 *   are safe from any thread at any time, also after the Lua state has been
 *   closed, as long as the caller holds a handle it has not released.
 *
 * Ownership of `data`: the one rule
 *   Every deliver call takes ownership of `data`, whatever it returns
 *   (deliver_copy takes none: it copies the caller's bytes, see there). The
 *   helper frees it exactly once with `free_data(data)` (with `free(data)`
 *   when `free_data` is NULL):
 *     - after `decode` ran on the Lua thread (and, for bgw_api.call, after
 *       `result` ran), whether they succeeded or raised an error;
 *     - before returning, when the item is rejected (BGW_FULL, BGW_CLOSED,
 *       BGW_TIMEOUT while waiting for room, BGW_INVALID);
 *     - when a queued item is cancelled: `stop()` in Lua, or the Lua state
 *       being closed (`lua_close`).
 *   `free_data` may run on the Lua thread or on the delivering thread. After
 *   a handle's Lua state is closed, the helper never calls `decode` or
 *   `result` again, and calls `free_data` only from inside a deliver call
 *   that rejects its item.
 *
 * Lifetimes
 *   Pending items are freed during the state's close while utility libraries
 *   are still loaded. A utility library whose threads may outlive its Lua
 *   state must keep its own code loaded (or join its threads from a __gc
 *   metamethod): bgworker cannot keep another library's code mapped.
 *   bgworker keeps its own code loaded for the life of the process, so a
 *   handle stays usable after `lua_close`.
 *
 * Handles
 *   A handle is released exactly once and not used afterwards. Doing either
 *   is a bug in the caller; bgworker notices it while the handle's memory
 *   has not been handed to a later `acquire` (at least 64 later releases),
 *   writes one line to stderr for the first such misuse in the process, and
 *   ignores it: a second release does nothing, and deliver or call with a
 *   released handle returns BGW_INVALID and frees `data`. A stale handle
 *   never points into freed memory, but once recycled it is live again for
 *   its new holder, and the misuse then goes unseen.
 *
 * fork()
 *   A dispatcher's run belongs to the process that started it. In a child
 *   made by fork() (through the C library) the inherited run is not
 *   running: bgworker never signals, locks or frees anything of it there,
 *   and forgets it when the child stops it, starts its own, or closes the
 *   Lua state (which never blocks). A handle acquired before the fork works
 *   in the child as in a new process: deliver and call return BGW_CLOSED
 *   (and free `data`) until the child starts its own run, and then go to
 *   it. set_capacity returns BGW_CLOSED while the inherited run is there.
 *   The parent keeps its run as if nothing happened. Threads do not survive
 *   fork(): a utility library restarts its own in the child, and must not
 *   find its own locks held there (pthread_atfork).
 */
#ifndef BGWORKER_H
#define BGWORKER_H

#include <stddef.h>
#include <lua.h>
#include <lauxlib.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Registry key under which the helper stores a light userdata: `const bgw_api *`. */
#define BGW_REGISTRY_KEY "bgworker.api"

/* Incremented when a change breaks existing callers. Additions are appended
 * to bgw_api and announced by a larger `size`. */
#define BGW_API_VERSION 1

/* Return codes. bgw_api.strerror gives their names. */
enum bgw_status {
    BGW_OK = 0,        /* delivered; for call: the callback returned and `result` ran */
    BGW_FULL = 1,      /* bounded queue full and timeout_ms was BGW_NOWAIT */
    BGW_CLOSED = 2,    /* the dispatcher is stopped, or the Lua state is closed */
    BGW_TIMEOUT = 3,   /* no room in time (deliver, call), or no reply in time (call) */
    BGW_INVALID = 4,   /* NULL or released handle, NULL decode; for call: NULL result or
                          BGW_NOWAIT; for set_capacity: above BGW_MAX_CAPACITY */
    BGW_CANCELLED = 5, /* call only: the item was cancelled before its callback ran to the end */
    BGW_ERROR = 6      /* call only: decode, the callback or result raised a Lua error */
};

/* Values for timeout_ms. Any positive value waits at most that many milliseconds. */
#define BGW_NOWAIT 0
#define BGW_FOREVER (-1)

/* The largest bound set_capacity accepts (2^31 - 1), as Lua's core.capacity
 * and opts.capacity do: far beyond any queue that fits in memory, and what
 * every Lua version holds as an exact integer. */
#define BGW_MAX_CAPACITY 2147483647

/* The largest record deliver_copy takes, in bytes. */
#define BGW_COPY_MAX 256

/* A counted reference to one Lua state's helper instance. Opaque. */
typedef struct bgw_handle bgw_handle;

/* A counted reference to a cancellation token (see "Cancellation" below). Opaque. */
typedef struct bgw_token bgw_token;

/* (Lua thread) Push the values for one item onto L and return how many:
 * first a function (the callback), then its arguments. It may raise a Lua
 * error; the helper then reports the error, frees `data`, and goes on.
 * It must not free `data`. */
typedef int (*bgw_decode_fn)(lua_State *L, void *data);

/* (any thread) Free `data`. Called exactly once per delivered item. */
typedef void (*bgw_free_fn)(void *data);

/* (Lua thread) For call: the callback's `nresults` return values are the top
 * `nresults` slots of L's stack. Copy what the waiting thread needs (for
 * example into memory that `data` points to); do not pop them. It may raise
 * a Lua error, and the waiting thread then gets BGW_ERROR. It runs only while
 * the caller of call is still waiting. */
typedef void (*bgw_result_fn)(lua_State *L, void *data, int nresults);

typedef struct bgw_api {
    /* BGW_API_VERSION of the helper that published this table. */
    unsigned int version;
    /* sizeof(bgw_api) in the helper: members past it are absent. */
    size_t size;

    /* (Lua thread) A new handle to L's helper instance, or NULL when L has
     * none (bgworker.core not opened in L, or L's instance closed). The
     * handle is valid until released, on any thread, even after lua_close. */
    bgw_handle *(*acquire)(lua_State *L);

    /* (any thread) Give a handle back. NULL is ignored. Each handle is
     * released exactly once; it must not be used afterwards (see "Handles"
     * above for what happens when it is). */
    void (*release)(bgw_handle *handle);

    /* (any thread) Queue one item. `data` belongs to the helper from this
     * call on, whatever the return code (see "Ownership" above).
     * timeout_ms matters only for a bounded queue that is full:
     *   BGW_NOWAIT  return BGW_FULL at once;
     *   BGW_FOREVER wait until there is room or the dispatcher stops;
     *   n > 0       wait up to n ms, then return BGW_TIMEOUT.
     * Returns BGW_OK, BGW_FULL, BGW_TIMEOUT, BGW_CLOSED or BGW_INVALID. */
    int (*deliver)(bgw_handle *handle, bgw_decode_fn decode, void *data, bgw_free_fn free_data,
                   int timeout_ms);

    /* (any thread but the Lua thread, which it would deadlock) Round trip:
     * queue one item and wait for its callback's return values. On the Lua
     * thread, decode runs, the callback is called, then `result` receives
     * its return values, and the waiting thread is released. timeout_ms
     * (BGW_FOREVER or n > 0 ms) bounds the whole wait: for room and for the
     * reply; BGW_NOWAIT is BGW_INVALID, since a round trip always waits.
     * `decode` and `result` run only while this call is waiting, so
     * `data` may point to the caller's stack through a field it owns;
     * `free_data` may run after call returned and must not touch that.
     * Returns BGW_OK (result ran), BGW_TIMEOUT, BGW_CANCELLED, BGW_ERROR,
     * BGW_CLOSED or BGW_INVALID. */
    int (*call)(bgw_handle *handle, bgw_decode_fn decode, bgw_result_fn result, void *data,
                bgw_free_fn free_data, int timeout_ms);

    /* (any thread) A static name for a return code, such as "BGW_FULL". */
    const char *(*strerror)(int code);

    /* (Lua thread) Bound L's queue to `capacity` items, 0 for unbounded: at
     * once if the dispatcher runs, else from its next start; until it stops
     * (stop clears the bound). Lua's core.capacity and start's
     * opts.capacity change the same setting. Producers waiting for room see
     * the new bound at once; a bound below the items queued makes producers
     * wait until the reader took the excess. Returns BGW_OK; BGW_INVALID
     * for a capacity above BGW_MAX_CAPACITY (a negative number converted to
     * size_t, say), and the setting stays as it was; BGW_CLOSED when L has
     * no open instance, or in a forked child that has not yet stopped the
     * run it inherited (see "fork()" above). */
    int (*set_capacity)(lua_State *L, size_t capacity);

    /* Cancellation (appended members: bgw_api_get checks `size`).
     *
     * A token is a Lua value made by `bgworker.core.token()`, which a Lua
     * caller hands to a utility library with the work it asks for (for
     * example `resolve(host, callback, token)`). When the caller gives up
     * (`token:cancel()`, a timeout), or its Lua state closes, the token is
     * cancelled, and the library's threads can see it: skip work nobody waits
     * for, and not deliver its result. A token says nothing about items
     * already delivered: their decode should check it too, and push a
     * function that does nothing when it is cancelled. */

    /* (Lua thread) A new reference to the token at `index` of L's stack
     * (absolute or relative), or NULL when that value is not a token, or L's
     * stack cannot grow by two slots. Never raises; leaves the stack as it
     * was. The reference is the caller's: it stays valid on any thread, also
     * after L is closed, until token_release. */
    bgw_token *(*token_get)(lua_State *L, int index);

    /* (any thread) Nonzero once the token is cancelled: by token:cancel(), or
     * because its Lua state was closed; it then stays nonzero. 0 while it is
     * not, and 0 for NULL. Lock-free: cheap enough to ask in a loop. */
    int (*token_cancelled)(const bgw_token *token);

    /* (any thread) Give a reference back. NULL is ignored. Each reference
     * from token_get is released exactly once and not used afterwards. */
    void (*token_release)(bgw_token *token);

    /* Delivery by copy (an appended member: bgw_api_get checks `size`).
     *
     * (any thread) Queue one item whose data is a copy of the `len` bytes at
     * `bytes`, for a small fixed record (a result code and a handle, a
     * timestamp, a few numbers): no malloc for the caller, and none per item
     * in the helper, which keeps the copy in its queue's own storage.
     *   Ownership: none changes hands. The helper reads `bytes` during the
     *     call only, whatever it returns; they stay the caller's (the stack
     *     is fine). There is nothing to free, so there is no free_data.
     *   decode(L, data): `data` points to the helper's copy of the `len`
     *     bytes, aligned for any type (max_align_t), valid only during that
     *     decode call: copy out what the callback needs, and do not keep
     *     the pointer. decode must not free it. A copy is decoded at most
     *     once; a cancelled one (stop(), lua_close) is dropped undecoded.
     *   Records hold plain bytes: a pointer in one is copied, not owned,
     *     and nothing frees what it points to when the item is cancelled.
     * `len` may be 0 (`bytes` may then be NULL). timeout_ms as for deliver.
     * Returns what deliver returns, on the same conditions: BGW_OK (queued),
     * BGW_FULL, BGW_TIMEOUT, BGW_CLOSED; BGW_INVALID also for `len` above
     * BGW_COPY_MAX, or NULL `bytes` with a nonzero `len`.
     *
     * Example: a worker thread reports a status and a count.
     *
     *   struct done { int status; long count; };
     *
     *   static int decode_done(lua_State *L, void *data)
     *   {
     *       const struct done *d = data;   // the helper's copy, aligned
     *       lua_getfield(L, LUA_REGISTRYINDEX, "mylib.on_done");
     *       lua_pushinteger(L, d->status);
     *       lua_pushinteger(L, d->count);
     *       return 3;                     // the callback and 2 arguments
     *   }
     *
     *   // on the worker thread:
     *   struct done d = { status, count };
     *   int rc = api->deliver_copy(handle, decode_done, &d, sizeof d, BGW_FOREVER);
     */
    int (*deliver_copy)(bgw_handle *handle, bgw_decode_fn decode, const void *bytes, size_t len,
                        int timeout_ms);

    /* Keeping the loop alive (appended members: bgw_api_get checks `size`).
     *
     * As libuv's handles (uv_ref, uv_unref) and Node-API's thread-safe
     * functions (napi_ref_threadsafe_function): a handle keeps its Lua
     * state's loop alive from acquire until it is released or unref'd. In
     * loops that end when their work is done (Copas 4's copas.loop(),
     * luv's uv.run()), the dispatcher then keeps the loop running, so that
     * what the library's threads deliver is dispatched. A library whose
     * threads deliver only while the program waits for something it asked
     * for (a reply to each request, say) unrefs its handle once acquired,
     * and lets the Lua side keep the loop alive for each request.
     * bgworker.pool and bgworker.dns do so.
     *
     * An unref'd handle delivers as before: its items are dispatched while
     * the loop runs for other reasons; once nothing keeps the loop alive,
     * they wait in the queue for its next turn (or are cancelled when the
     * dispatcher stops, as any pending item).
     *
     * (Lua thread) The handle keeps L's loop alive again (ref), or no
     * longer (unref). Each says so once: a second ref or unref in a row
     * changes nothing, and release ends what ref began. L is the Lua state
     * the handle was acquired in. Returns BGW_OK, or BGW_INVALID for a NULL
     * or released handle. */
    int (*ref)(lua_State *L, bgw_handle *handle);
    int (*unref)(lua_State *L, bgw_handle *handle);
} bgw_api;

/* (Lua thread) The helper's API published in L, or NULL when bgworker.core
 * is not loaded in L or speaks another major version. Leaves the stack as
 * it was. */
static inline const bgw_api *bgw_api_get(lua_State *L)
{
    const bgw_api *api;
    lua_getfield(L, LUA_REGISTRYINDEX, BGW_REGISTRY_KEY);
    api = (const bgw_api *)lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (api == NULL || api->version != BGW_API_VERSION || api->size < sizeof(bgw_api))
        return NULL;
    return api;
}

/* (any thread) The seed's simple form: deliver `data` (freed with free())
 * for `decode`, waiting for room if the queue is bounded. */
static inline int bgw_deliver_simple(const bgw_api *api, bgw_handle *handle, bgw_decode_fn decode,
                                     void *data)
{
    return api->deliver(handle, decode, data, NULL, BGW_FOREVER);
}

#ifdef __cplusplus
}
#endif

#endif /* BGWORKER_H */
