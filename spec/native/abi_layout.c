/*
 * abi_layout.c: print bgw_api's layout as include/bgworker.h declares it,
 * and the header's constants, for the ABI test in
 * crates/bgworker-util/src/abi.rs, which compares them with the two Rust
 * mirrors of the struct (src/capi.rs and that file).
 *
 * Output, one per line: "sizeof <n>", then "<member> <offset> <size>" for
 * each member in order, then "end <offset + size of the last member>", then
 * "<constant> <value>".
 */
#include <stddef.h>
#include <stdio.h>

#include "bgworker.h"

/* bgw_api's members, in order. A new member is appended here, and to the
 * list in crates/bgworker-util/src/abi.rs. */
#define BGW_API_MEMBERS(X)                                                                         \
    X(version) X(size) X(acquire) X(release) X(deliver) X(call) X(strerror) X(set_capacity)           \
        X(token_get) X(token_cancelled) X(token_release) X(deliver_copy) X(ref)     \
        X(unref)

#define PRINT_MEMBER(member)                                                                       \
    printf("%s %zu %zu\n", #member, offsetof(bgw_api, member), sizeof(((bgw_api *)0)->member));    \
    end = offsetof(bgw_api, member) + sizeof(((bgw_api *)0)->member);

int main(void)
{
    size_t end = 0;
    printf("sizeof %zu\n", sizeof(bgw_api));
    BGW_API_MEMBERS(PRINT_MEMBER)
    printf("end %zu\n", end);
    printf("BGW_API_VERSION %d\n", BGW_API_VERSION);
    printf("BGW_MAX_CAPACITY %ld\n", (long)BGW_MAX_CAPACITY);
    printf("BGW_COPY_MAX %d\n", BGW_COPY_MAX);
    return 0;
}
