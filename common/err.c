#include "err.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>

const char *td_strerror(int err)
{
    switch (err) {
    case TD_OK:
        return "success";
#define TD__ERR_MSG(name, value, msg)                                                              \
    case TD_##name:                                                                                \
        return msg;
        TD_ERR_MAP(TD__ERR_MSG)
#undef TD__ERR_MSG
    }
    return "unknown error";
}

const char *td_err_name(int err)
{
    switch (err) {
    case TD_OK:
        return "TD_OK";
#define TD__ERR_NAME(name, value, msg)                                                             \
    case TD_##name:                                                                                \
        return "TD_" #name;
        TD_ERR_MAP(TD__ERR_NAME)
#undef TD__ERR_NAME
    }
    return "TD_UNKNOWN";
}

int td_err_from_errno(int errnum)
{
    switch (errnum) {
    case 0:
        return TD_OK;
    case EINVAL:
        return TD_EINVAL;
    case ENOMEM:
        return TD_ENOMEM;
    case ENOENT:
        return TD_ENOENT;
    case EEXIST:
        return TD_EEXIST;
    case EAGAIN:
        return TD_EAGAIN;
    case ETIMEDOUT:
        return TD_ETIMEDOUT;
    case ECANCELED:
        return TD_ECANCELED;
    case ECONNREFUSED:
        return TD_ECONNREFUSED;
    case ECONNRESET:
    case EPIPE:
        return TD_ECONNRESET;
    case ERANGE:
    case EOVERFLOW:
        return TD_ERANGE;
    case ENOSPC:
        return TD_ENOSPC;
    case ENODEV:
        return TD_ENODEV;
    case ENAMETOOLONG:
    case E2BIG:
        return TD_ETOOLONG;
    case ENOTSUP:
        return TD_EUNSUPPORTED;
    default:
        return TD_EIO;
    }
}

void td_err_set(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int td_err_fail(char *err, size_t errlen, int code, const char *fmt, ...)
{
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}
