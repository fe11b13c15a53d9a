/*
 * bgworker_tokentest: the cancellation tokens of bgworker.h seen from a C
 * library, for spec/token_spec.lua. Every question about a token is asked
 * from a thread of its own, as a library's worker would.
 *
 *   tokentest.hold(value)      -> a holder of a new reference, or nil when
 *                                 value is not a token
 *   holder:cancelled()         -> token_cancelled, asked from a new thread
 *   holder:release()           -> token_release (once; also on __gc)
 *   tokentest.keep(value)      -> true when a reference was kept in a static,
 *                                 to outlive the state (false: not a token)
 *   tokentest.kept_cancelled() -> token_cancelled of the kept reference,
 *                                 from a new thread; then it is released
 *   tokentest.null()           -> token_cancelled(NULL) == 0, after
 *                                 token_release(NULL)
 */
#include <pthread.h>
#include <stdlib.h>

#include "bgworker.h"

#define HOLDER "bgworker_tokentest.Holder"

/* The API, also for kept_cancelled after the state that gave it closed:
 * bgworker keeps its code, so the table, loaded for the process. */
static const bgw_api *api_used;
static bgw_token *kept;

static const bgw_api *api_of(lua_State *L)
{
    const bgw_api *api = bgw_api_get(L);
    if (api == NULL)
        luaL_error(L, "require \"bgworker.core\" first");
    api_used = api;
    return api;
}

struct question {
    const bgw_api *api;
    const bgw_token *token;
    int answer;
};

static void *ask(void *arg)
{
    struct question *q = arg;
    q->answer = q->api->token_cancelled(q->token);
    return NULL;
}

/* token_cancelled(token), asked from a thread of its own. */
static int ask_from_thread(lua_State *L, const bgw_api *api, const bgw_token *token)
{
    struct question q = { api, token, -1 };
    pthread_t thread;
    if (pthread_create(&thread, NULL, ask, &q) != 0)
        return luaL_error(L, "cannot start a thread");
    pthread_join(thread, NULL);
    return q.answer;
}

static int hold(lua_State *L)
{
    const bgw_api *api = api_of(L);
    luaL_checkany(L, 1);
    bgw_token **holder = lua_newuserdata(L, sizeof *holder);
    *holder = NULL;
    luaL_getmetatable(L, HOLDER);
    lua_setmetatable(L, -2);
    /* A relative index, below the holder. */
    *holder = api->token_get(L, -2);
    if (*holder == NULL)
        lua_pushnil(L);
    return 1;
}

static int holder_cancelled(lua_State *L)
{
    bgw_token **holder = luaL_checkudata(L, 1, HOLDER);
    luaL_argcheck(L, *holder != NULL, 1, "released");
    lua_pushboolean(L, ask_from_thread(L, api_used, *holder) != 0);
    return 1;
}

static int holder_release(lua_State *L)
{
    bgw_token **holder = luaL_checkudata(L, 1, HOLDER);
    if (*holder != NULL) {
        api_used->token_release(*holder);
        *holder = NULL;
    }
    return 0;
}

static int keep(lua_State *L)
{
    const bgw_api *api = api_of(L);
    luaL_checkany(L, 1);
    if (kept != NULL)
        return luaL_error(L, "a reference is kept already");
    kept = api->token_get(L, 1);
    lua_pushboolean(L, kept != NULL);
    return 1;
}

static int kept_cancelled(lua_State *L)
{
    if (kept == NULL)
        return luaL_error(L, "no reference is kept");
    int answer = ask_from_thread(L, api_used, kept);
    api_used->token_release(kept);
    kept = NULL;
    lua_pushboolean(L, answer != 0);
    return 1;
}

static int null(lua_State *L)
{
    const bgw_api *api = api_of(L);
    api->token_release(NULL);
    lua_pushboolean(L, api->token_cancelled(NULL) == 0);
    return 1;
}

int luaopen_bgworker_tokentest(lua_State *L)
{
    if (luaL_newmetatable(L, HOLDER)) {
        lua_newtable(L);
        lua_pushcfunction(L, holder_cancelled);
        lua_setfield(L, -2, "cancelled");
        lua_pushcfunction(L, holder_release);
        lua_setfield(L, -2, "release");
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, holder_release);
        lua_setfield(L, -2, "__gc");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushcfunction(L, hold);
    lua_setfield(L, -2, "hold");
    lua_pushcfunction(L, keep);
    lua_setfield(L, -2, "keep");
    lua_pushcfunction(L, kept_cancelled);
    lua_setfield(L, -2, "kept_cancelled");
    lua_pushcfunction(L, null);
    lua_setfield(L, -2, "null");
    return 1;
}
