/*
 * answer.c: the smallest utility library, the one the README shows. One
 * thread computes a number and delivers it to a Lua callback through
 * bgworker. It leaves out error checks; examples/c/ticker.c is the full
 * example. spec/answer_spec.lua checks that it works as the README says.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include "bgworker.h"

struct job { const bgw_api *api; bgw_handle *handle; int ref; lua_Number value; };

/* On the Lua thread, inside poll(): push the callback, then its arguments. */
static int decode(lua_State *L, void *data)
{
    struct job *job = data;
    lua_rawgeti(L, LUA_REGISTRYINDEX, job->ref);
    luaL_unref(L, LUA_REGISTRYINDEX, job->ref);
    lua_pushnumber(L, job->value);
    return 2;
}

static void *work(void *arg)
{
    struct job *job = arg;
    const bgw_api *api = job->api;
    bgw_handle *handle = job->handle;
    job->value = 42;                 /* the slow part */
    /* From here on the job belongs to bgworker, whatever deliver returns:
     * it is freed with free() after decode, or when refused or cancelled. */
    api->deliver(handle, decode, job, NULL, BGW_FOREVER);
    api->release(handle);
    return NULL;
}

static int answer(lua_State *L)      /* answer(callback) */
{
    const bgw_api *api = bgw_api_get(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (api == NULL) return luaL_error(L, "require \"bgworker.core\" first");
    struct job *job = malloc(sizeof *job);
    job->api = api;
    job->handle = api->acquire(L);
    lua_pushvalue(L, 1);
    job->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    pthread_t thread;
    pthread_create(&thread, NULL, work, job);
    pthread_detach(thread);
    return 0;
}

int luaopen_answer(lua_State *L)
{
    lua_newtable(L);
    lua_pushcfunction(L, answer);
    lua_setfield(L, -2, "answer");
    return 1;
}
