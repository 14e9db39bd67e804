/* Unit tests for kvx_plan: the op list NCCL peers derive must be identical
 * on both sides and reject anything outside the registered blocks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "kvtransfer/kvx_plan.h"

static void test_coalesce_and_order(void **s)
{
    uint32_t reg[] = {12, 10, 11, 3, 40};
    /* Posted in arbitrary order; 10,11,12 come from consecutive sources. */
    kvx_pair pairs[] = {{7, 40}, {5, 12}, {3, 10}, {4, 11}, {0, 3}};
    kvx_plan_op ops[5];
    int n = kvx_plan_build(reg, 5, pairs, 5, 64, 64, ops);
    assert_int_equal(n, 3);
    assert_int_equal(ops[0].dst, 3);
    assert_int_equal(ops[0].src, 0);
    assert_int_equal(ops[0].count, 1);
    assert_int_equal(ops[1].dst, 10);
    assert_int_equal(ops[1].src, 3);
    assert_int_equal(ops[1].count, 3);
    assert_int_equal(ops[2].dst, 40);
    assert_int_equal(ops[2].count, 1);
}

static void test_no_merge_when_src_gap(void **s)
{
    uint32_t reg[] = {1, 2, 3};
    kvx_pair pairs[] = {{9, 1}, {10, 2}, {20, 3}};
    kvx_plan_op ops[3];
    assert_int_equal(kvx_plan_build(reg, 3, pairs, 3, 64, 64, ops), 2);
    assert_int_equal(ops[0].count, 2);
    assert_int_equal(ops[1].src, 20);
}

/* Sender and receiver see the pairs in different orders (the receiver gets
 * them from the wire as posted, the sender may have built them differently);
 * the plan is the same. Random trials. */
static void test_both_sides_agree(void **s)
{
    srand(1234);
    for (int trial = 0; trial < 200; trial++) {
        int n = 1 + rand() % 40;
        uint32_t reg[40];
        kvx_pair a[40], b[40];
        uint32_t used[128] = {0};
        for (int i = 0; i < n; i++) {
            uint32_t d;
            do
                d = (uint32_t)(rand() % 128);
            while (used[d]);
            used[d] = 1;
            reg[i] = d;
            a[i].dst = d;
            a[i].src = rand() % 2 ? d : (uint32_t)(rand() % 128);
        }
        memcpy(b, a, sizeof(a));
        for (int i = n - 1; i > 0; i--) {
            int j = rand() % (i + 1);
            kvx_pair t = b[i];
            b[i] = b[j];
            b[j] = t;
        }
        kvx_plan_op oa[40], ob[40];
        int na = kvx_plan_build(reg, n, a, n, 128, 128, oa);
        int nb = kvx_plan_build(reg, n, b, n, 128, 128, ob);
        assert_true(na > 0);
        assert_int_equal(na, nb);
        assert_memory_equal(oa, ob, sizeof(kvx_plan_op) * (size_t)na);
        /* The ops cover exactly the pairs. */
        uint32_t total = 0;
        for (int i = 0; i < na; i++)
            total += oa[i].count;
        assert_int_equal(total, (uint32_t)n);
    }
}

static void test_rejects(void **s)
{
    uint32_t reg[] = {1, 2};
    kvx_plan_op ops[4];
    kvx_pair dup[] = {{0, 1}, {5, 1}};
    assert_int_equal(kvx_plan_build(reg, 2, dup, 2, 64, 64, ops), TD_EINVAL);
    kvx_pair unreg[] = {{0, 3}};
    assert_int_equal(kvx_plan_build(reg, 2, unreg, 1, 64, 64, ops), TD_EINVAL);
    kvx_pair oob_src[] = {{64, 1}};
    assert_int_equal(kvx_plan_build(reg, 2, oob_src, 1, 64, 64, ops), TD_EINVAL);
    kvx_pair oob_dst[] = {{0, 70}};
    uint32_t reg2[] = {70};
    assert_int_equal(kvx_plan_build(reg2, 1, oob_dst, 1, 64, 64, ops), TD_EINVAL);
    assert_int_equal(kvx_plan_build(reg, 2, NULL, 0, 64, 64, ops), 0);
    assert_int_equal(kvx_plan_build(reg, -1, dup, 1, 64, 64, ops), TD_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_coalesce_and_order),
        cmocka_unit_test(test_no_merge_when_src_gap),
        cmocka_unit_test(test_both_sides_agree),
        cmocka_unit_test(test_rejects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
