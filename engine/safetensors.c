#include "engine/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"

struct sft_file {
    void *map;        /* whole file, read-only */
    size_t map_bytes; /* file size */
    sft_tensor *tensors;
    size_t n_tensors;
    char *names; /* all names, NUL-separated; tensors[i].name points here */
};

size_t sft_dtype_size(enum sft_dtype dtype)
{
    switch (dtype) {
    case SFT_F32:
        return 4;
    case SFT_F16:
    case SFT_BF16:
        return 2;
    default:
        return 0;
    }
}

/* Element size of any dtype name safetensors defines; 0 when unknown. */
static size_t sft__name_size(const char *s, enum sft_dtype *dt)
{
    static const struct {
        const char *name;
        size_t size;
        enum sft_dtype dt;
    } table[] = {
        {"F32", 4, SFT_F32},    {"F16", 2, SFT_F16},       {"BF16", 2, SFT_BF16},
        {"F64", 8, SFT_OTHER},  {"I64", 8, SFT_OTHER},     {"U64", 8, SFT_OTHER},
        {"I32", 4, SFT_OTHER},  {"U32", 4, SFT_OTHER},     {"I16", 2, SFT_OTHER},
        {"U16", 2, SFT_OTHER},  {"I8", 1, SFT_OTHER},      {"U8", 1, SFT_OTHER},
        {"BOOL", 1, SFT_OTHER}, {"F8_E4M3", 1, SFT_OTHER}, {"F8_E5M2", 1, SFT_OTHER},
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        if (strcmp(s, table[i].name) == 0) {
            *dt = table[i].dt;
            return table[i].size;
        }
    }
    return 0;
}

static const char *sft__static_dtype_name(const char *s)
{
    static const char *names[] = {"F32", "F16", "BF16", "F64", "I64",  "U64",     "I32",    "U32",
                                  "I16", "U16", "I8",   "U8",  "BOOL", "F8_E4M3", "F8_E5M2"};
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (strcmp(s, names[i]) == 0) return names[i];
    return "?";
}

/* Exact non-negative integer from a JSON number, or -1. Offsets above 2^53 are
 * not representable in cJSON's double and are refused. */
static int64_t sft__json_int(const cJSON *v)
{
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= 0.0) || d > 9007199254740992.0) return -1;
    int64_t i = (int64_t)d;
    if ((double)i != d) return -1;
    return i;
}

static int sft__parse(sft_file *f, const char *json, size_t json_len, size_t data_off, char *err,
                      size_t errlen)
{
    int rc = TD_EFORMAT;
    cJSON *root = cJSON_ParseWithLength(json, json_len);
    if (!root || !cJSON_IsObject(root)) {
        rc = td_err_fail(err, errlen, TD_EFORMAT, "safetensors: header is not a JSON object");
        goto out;
    }
    size_t n = 0, names_bytes = 0;
    for (cJSON *it = root->child; it; it = it->next) {
        if (strcmp(it->string, "__metadata__") == 0) continue;
        n++;
        names_bytes += strlen(it->string) + 1;
    }
    f->tensors = calloc(n ? n : 1, sizeof(*f->tensors));
    f->names = malloc(names_bytes ? names_bytes : 1);
    if (!f->tensors || !f->names) {
        rc = td_err_fail(err, errlen, TD_ENOMEM, "safetensors: out of memory");
        goto out;
    }
    size_t data_bytes = f->map_bytes - data_off;
    char *np = f->names;
    for (cJSON *it = root->child; it; it = it->next) {
        if (strcmp(it->string, "__metadata__") == 0) continue;
        sft_tensor *t = &f->tensors[f->n_tensors];
        size_t nl = strlen(it->string) + 1;
        memcpy(np, it->string, nl);
        t->name = np;
        np += nl;
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(it, "dtype");
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(it, "shape");
        const cJSON *offs = cJSON_GetObjectItemCaseSensitive(it, "data_offsets");
        if (!cJSON_IsObject(it) || !cJSON_IsString(dt) || !cJSON_IsArray(shape) ||
            !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2) {
            rc =
                td_err_fail(err, errlen, TD_EFORMAT,
                            "safetensors: tensor '%s' lacks dtype, shape or data_offsets", t->name);
            goto out;
        }
        size_t esize = sft__name_size(dt->valuestring, &t->dtype);
        if (esize == 0) {
            rc = td_err_fail(err, errlen, TD_EFORMAT,
                             "safetensors: tensor '%s' has unknown dtype '%s'", t->name,
                             dt->valuestring);
            goto out;
        }
        t->dtype_name = sft__static_dtype_name(dt->valuestring);
        int nd = cJSON_GetArraySize(shape);
        if (nd > SFT_MAX_DIMS) {
            rc = td_err_fail(err, errlen, TD_EFORMAT,
                             "safetensors: tensor '%s' has %d dims (max %d)", t->name, nd,
                             SFT_MAX_DIMS);
            goto out;
        }
        t->ndim = nd;
        uint64_t count = 1;
        for (int d = 0; d < nd; d++) {
            int64_t v = sft__json_int(cJSON_GetArrayItem(shape, d));
            if (v < 0 || (v > 0 && count > UINT64_MAX / (uint64_t)v)) {
                rc = td_err_fail(err, errlen, TD_EFORMAT,
                                 "safetensors: tensor '%s' has a bad shape", t->name);
                goto out;
            }
            t->shape[d] = v;
            count *= (uint64_t)v;
        }
        int64_t b = sft__json_int(cJSON_GetArrayItem(offs, 0));
        int64_t e = sft__json_int(cJSON_GetArrayItem(offs, 1));
        if (b < 0 || e < b || (uint64_t)e > data_bytes) {
            rc = td_err_fail(
                err, errlen, TD_EFORMAT,
                "safetensors: tensor '%s' data_offsets [%lld, %lld] outside the %zu-byte "
                "data section",
                t->name, (long long)b, (long long)e, data_bytes);
            goto out;
        }
        if (count > UINT64_MAX / esize || count * esize != (uint64_t)(e - b)) {
            /* A dtype nothing here computes with is the first thing to fix
             * (a size that does not match it may follow from it). */
            if (t->dtype == SFT_OTHER)
                rc = td_err_fail(err, errlen, TD_EUNSUPPORTED,
                                 "safetensors: tensor '%s' has unsupported dtype %s", t->name,
                                 t->dtype_name);
            else if (count > UINT64_MAX / esize)
                rc = td_err_fail(err, errlen, TD_EFORMAT,
                                 "safetensors: tensor '%s' has a shape too large for %s", t->name,
                                 t->dtype_name);
            else
                rc = td_err_fail(err, errlen, TD_EFORMAT,
                                 "safetensors: tensor '%s' holds %lld bytes, its %s shape needs "
                                 "%llu",
                                 t->name, (long long)(e - b), t->dtype_name,
                                 (unsigned long long)(count * esize));
            goto out;
        }
        t->data = (const char *)f->map + data_off + (size_t)b;
        t->nbytes = (size_t)(e - b);
        f->n_tensors++;
    }
    rc = 0;
out:
    cJSON_Delete(root);
    return rc;
}

int sft_open(const char *path, sft_file **out, char *err, size_t errlen)
{
    *out = NULL;
    sft_file *f = calloc(1, sizeof(*f));
    if (!f) return td_err_fail(err, errlen, TD_ENOMEM, "safetensors: out of memory");
    int rc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        rc = td_err_fail(err, errlen, td_err_from_errno(e), "safetensors: cannot open %s: %s", path,
                         strerror(e));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        rc = td_err_fail(err, errlen, TD_EIO, "safetensors: stat %s: %s", path, strerror(e));
        goto fail;
    }
    if (st.st_size < 8) {
        close(fd);
        rc = td_err_fail(err, errlen, TD_EFORMAT, "safetensors: %s is truncated (%lld bytes)", path,
                         (long long)st.st_size);
        goto fail;
    }
    f->map_bytes = (size_t)st.st_size;
    f->map = mmap(NULL, f->map_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = td_err_fail(err, errlen, TD_EIO, "safetensors: mmap %s: %s", path, strerror(errno));
        goto fail;
    }
    const unsigned char *p = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | p[i];
    if (hlen > SFT_MAX_HEADER) {
        rc = td_err_fail(err, errlen, TD_EFORMAT,
                         "safetensors: %s header length %llu exceeds the %u-byte limit", path,
                         (unsigned long long)hlen, SFT_MAX_HEADER);
        goto fail;
    }
    if (hlen > f->map_bytes - 8) {
        rc =
            td_err_fail(err, errlen, TD_EFORMAT,
                        "safetensors: %s header length %llu runs past the end of the %zu-byte file",
                        path, (unsigned long long)hlen, f->map_bytes);
        goto fail;
    }
    rc = sft__parse(f, (const char *)p + 8, (size_t)hlen, 8 + (size_t)hlen, err, errlen);
    if (rc != 0) goto fail;
    *out = f;
    return 0;
fail:
    sft_close(f);
    return rc;
}

void sft_close(sft_file *f)
{
    if (!f) return;
    if (f->map) munmap(f->map, f->map_bytes);
    free(f->tensors);
    free(f->names);
    free(f);
}

size_t sft_count(const sft_file *f)
{
    return f->n_tensors;
}

const sft_tensor *sft_at(const sft_file *f, size_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const sft_tensor *sft_find(const sft_file *f, const char *name)
{
    for (size_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}
