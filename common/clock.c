#include "clock.h"

#include <errno.h>
#include <time.h>

static int64_t read_clock(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * TD_NS_PER_S + ts.tv_nsec;
}

int64_t td_now_ns(void)
{
    return read_clock(CLOCK_MONOTONIC);
}

int64_t td_wall_ns(void)
{
    return read_clock(CLOCK_REALTIME);
}

int64_t td_thread_cpu_ns(void)
{
    return read_clock(CLOCK_THREAD_CPUTIME_ID);
}

void td_sleep_until_ns(int64_t deadline_ns)
{
    struct timespec ts = {.tv_sec = deadline_ns / TD_NS_PER_S,
                          .tv_nsec = deadline_ns % TD_NS_PER_S};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

void td_sleep_ns(int64_t ns)
{
    if (ns > 0) td_sleep_until_ns(td_now_ns() + ns);
}
