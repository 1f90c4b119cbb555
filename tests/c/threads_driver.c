/* The runtime's default thread count on its own, as a program using a shipped
 * library gets it (nothing sets the count first): prints sc_get_num_threads()
 * (tests/test_threads.py builds it with runtime/structc_rt.c). */
#include "structc_rt.h"

#include <stdio.h>

int main(void) {
    printf("%d\n", sc_get_num_threads());
    return 0;
}
