/* err: one table of error codes for every Tandem library.
 *
 * Functions return 0 on success or a negative TD_E* code. Foreign errors
 * (errno, gRPC status, CUDA, NCCL) are converted at the boundary and the
 * original is logged there. TD_EAGAIN ("try again later") and TD_EDECLINED
 * ("a policy said no": pool full, admission rejected) are distinct on purpose.
 */
#ifndef TANDEM_COMMON_ERR_H
#define TANDEM_COMMON_ERR_H

#include <stddef.h>

/* X(name, value, message) */
#define TD_ERR_MAP(X)                                                                              \
    X(EINVAL, -1, "invalid argument")                                                              \
    X(ENOMEM, -2, "out of memory")                                                                 \
    X(EIO, -3, "input/output error")                                                               \
    X(ENOENT, -4, "not found")                                                                     \
    X(EEXIST, -5, "already exists")                                                                \
    X(EAGAIN, -6, "resource temporarily unavailable, try again")                                   \
    X(EDECLINED, -7, "declined by policy")                                                         \
    X(ETIMEDOUT, -8, "deadline exceeded")                                                          \
    X(ECANCELED, -9, "canceled")                                                                   \
    X(ECONNREFUSED, -10, "connection refused")                                                     \
    X(ECONNRESET, -11, "connection reset by peer")                                                 \
    X(EPROTO, -12, "protocol error")                                                               \
    X(EFORMAT, -13, "malformed input")                                                             \
    X(EUNSUPPORTED, -14, "not supported")                                                          \
    X(EMISMATCH, -15, "configuration mismatch between peers")                                      \
    X(ERANGE, -16, "value out of range")                                                           \
    X(ENOSPC, -17, "no space left (pool full)")                                                    \
    X(ENODEV, -18, "no device")                                                                    \
    X(ECLOSED, -19, "closed")                                                                      \
    X(EUNAVAILABLE, -20, "service unavailable")                                                    \
    X(EINTERNAL, -21, "internal error")                                                            \
    X(ETOOLONG, -22, "input too long")

enum td_err {
    TD_OK = 0,
#define TD__ERR_ENUM(name, value, msg) TD_##name = (value),
    TD_ERR_MAP(TD__ERR_ENUM)
#undef TD__ERR_ENUM
};

/* Static message for a code ("unknown error" for codes not in the table). */
const char *td_strerror(int err);

/* Static name of a code, e.g. "TD_EINVAL". */
const char *td_err_name(int err);

/* Writes a printf-style reason into err[errlen] (nothing when err is NULL or
 * errlen is 0): the "char *err, size_t errlen" out-parameter that loaders and
 * parsers take next to their TD_E* return code. */
void td_err_set(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* td_err_set, then returns code: `return td_err_fail(err, errlen, TD_EFORMAT, ...);` */
int td_err_fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Converts an errno value (positive) to a TD_E* code. */
int td_err_from_errno(int errnum);

#endif
