/* clock: monotonic and wall-clock helpers. All durations are int64 nanoseconds
 * unless a name says otherwise. */
#ifndef TANDEM_COMMON_CLOCK_H
#define TANDEM_COMMON_CLOCK_H

#include <stdint.h>

#define TD_NS_PER_US 1000LL
#define TD_NS_PER_MS 1000000LL
#define TD_NS_PER_S  1000000000LL

/* CLOCK_MONOTONIC in ns; never goes backwards. Use for deadlines and timings. */
int64_t td_now_ns(void);

/* CLOCK_REALTIME in ns since the Unix epoch; only for timestamps shown to people. */
int64_t td_wall_ns(void);

/* CPU time of the calling thread in ns (CLOCK_THREAD_CPUTIME_ID): on a shared
 * host, a time slice lost to another process does not count. For timing
 * single-threaded benchmarks and probes. */
int64_t td_thread_cpu_ns(void);

static inline double td_ns_to_ms(int64_t ns)
{
    return (double)ns / 1e6;
}

static inline double td_ns_to_s(int64_t ns)
{
    return (double)ns / 1e9;
}

/* Sleeps until the monotonic time reaches deadline_ns (returns at once when past). */
void td_sleep_until_ns(int64_t deadline_ns);

/* Sleeps for ns nanoseconds (restarts after signals). */
void td_sleep_ns(int64_t ns);

#endif
