/* Unit tests for common/err, common/log and common/clock. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "common/clock.h"
#include "common/err.h"
#include "common/log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void test_err_table(void **state)
{
    (void)state;
    assert_string_equal(td_strerror(TD_OK), "success");
    assert_string_equal(td_strerror(TD_ENOSPC), "no space left (pool full)");
    assert_string_equal(td_err_name(TD_EDECLINED), "TD_EDECLINED");
    assert_string_equal(td_strerror(-9999), "unknown error");
    assert_int_equal(td_err_from_errno(ECONNREFUSED), TD_ECONNREFUSED);
    assert_int_equal(td_err_from_errno(EPIPE), TD_ECONNRESET);
    assert_true(TD_EAGAIN != TD_EDECLINED);
}

static void test_err_message_out_param(void **state)
{
    (void)state;
    char buf[16];
    assert_int_equal(td_err_fail(buf, sizeof(buf), TD_EFORMAT, "bad %s at %d", "tensor", 7),
                     TD_EFORMAT);
    assert_string_equal(buf, "bad tensor at 7");
    /* Truncated, still NUL-terminated. */
    td_err_set(buf, sizeof(buf), "%s", "a reason longer than the buffer");
    assert_string_equal(buf, "a reason longer");
    /* No buffer: only the code comes back. */
    assert_int_equal(td_err_fail(NULL, 0, TD_ENOENT, "x"), TD_ENOENT);
    td_err_set(buf, 0, "untouched");
    assert_string_equal(buf, "a reason longer");
}

static void test_log_one_line_logfmt(void **state)
{
    (void)state;
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    td_log_set_fd(fds[1]);
    td_log_set_level(TD_LOG_INFO);
    td_log_debug("test", "hidden", "x=%d", 1);
    td_log_info("test", "shown", "port=%d id=%s", 7000, "r-1");
    td_log_warn("test", "bare", NULL);
    td_log_set_fd(2);
    close(fds[1]);
    char buf[1024] = {0};
    ssize_t n = read(fds[0], buf, sizeof(buf) - 1);
    close(fds[0]);
    assert_true(n > 0);
    assert_null(strstr(buf, "hidden"));
    char *first = buf;
    char *nl = strchr(first, '\n');
    assert_non_null(nl);
    *nl = '\0';
    assert_non_null(strstr(first, "level=info mod=test event=shown port=7000 id=r-1"));
    assert_true(strncmp(first, "ts=", 3) == 0);
    assert_non_null(strstr(nl + 1, "level=warn mod=test event=bare\n"));

    enum td_log_level level;
    assert_int_equal(td_log_level_parse("warn", &level), 0);
    assert_int_equal(level, TD_LOG_WARN);
    assert_int_equal(td_log_level_parse("loud", &level), TD_EINVAL);
}

static void test_clock_monotonic(void **state)
{
    (void)state;
    int64_t a = td_now_ns();
    td_sleep_ns(2 * TD_NS_PER_MS);
    int64_t b = td_now_ns();
    assert_true(b - a >= 2 * TD_NS_PER_MS);
    assert_true(td_wall_ns() > 1600000000LL * TD_NS_PER_S);
}

/* Thread CPU time: a sleep costs (almost) none of it, a busy loop does. */
static void test_clock_thread_cpu(void **state)
{
    (void)state;
    int64_t c0 = td_thread_cpu_ns();
    td_sleep_ns(20 * TD_NS_PER_MS);
    int64_t c1 = td_thread_cpu_ns();
    assert_true(c1 >= c0);
    assert_true(c1 - c0 < 10 * TD_NS_PER_MS);
    int64_t give_up = td_now_ns() + 2 * TD_NS_PER_S;
    volatile uint64_t spin = 0;
    while (td_thread_cpu_ns() - c1 < 2 * TD_NS_PER_MS && td_now_ns() < give_up)
        spin++;
    assert_true(td_thread_cpu_ns() - c1 >= 2 * TD_NS_PER_MS);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_err_table),           cmocka_unit_test(test_err_message_out_param),
        cmocka_unit_test(test_log_one_line_logfmt), cmocka_unit_test(test_clock_monotonic),
        cmocka_unit_test(test_clock_thread_cpu),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
