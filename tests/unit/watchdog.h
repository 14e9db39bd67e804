/* A time bound for a test step that blocks forever when the code under test
 * is wrong (a deadline or a timeout ignored): the step fails in seconds and
 * says why, instead of hanging until CTest's timeout.
 *
 *   watchdog_arm(5, "rpc_client_unary past its 200 ms deadline");
 *   ...the step...
 *   watchdog_disarm();
 *
 * When the bound passes, the process writes "watchdog: <what>: still running
 * after N s" to stderr and exits with status 1 (the test has failed; cleanup
 * would block on the same stuck call). One bound at a time per process
 * (alarm(2)); header-only, like fail_alloc.h. */
#ifndef TANDEM_TESTS_WATCHDOG_H
#define TANDEM_TESTS_WATCHDOG_H

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static char watchdog_msg[256];
static volatile sig_atomic_t watchdog_msg_len;

static void watchdog_fire(int sig)
{
    (void)sig;
    /* Only async-signal-safe calls here. */
    ssize_t w = write(2, watchdog_msg, (size_t)watchdog_msg_len);
    (void)w;
    _exit(1);
}

/* Exits the process with a message if watchdog_disarm is not called within
 * `seconds`. what: the step, for the message (copied). */
static void watchdog_arm(unsigned seconds, const char *what)
{
    int n = snprintf(watchdog_msg, sizeof(watchdog_msg),
                     "\nwatchdog: %s: still running after %u s\n", what, seconds);
    watchdog_msg_len = n < 0                            ? 0
                       : n >= (int)sizeof(watchdog_msg) ? (int)sizeof(watchdog_msg) - 1
                                                        : n;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = watchdog_fire;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGALRM, &sa, NULL);
    alarm(seconds);
}

static void watchdog_disarm(void)
{
    alarm(0);
}

#endif
