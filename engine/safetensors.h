/* safetensors: a read-only, memory-mapped view of one .safetensors file.
 *
 * File format: u64 little-endian header length N, N bytes of JSON
 *   {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
 *    "__metadata__": {...}}
 * then the data section; offsets are relative to the start of the data section.
 *
 * sft_open validates everything before returning: header size (at most
 * SFT_MAX_HEADER bytes), JSON shape, dtype names, that shape * dtype size equals
 * end - begin (overflow-checked), and that every range lies inside the file.
 * Errors: TD_EIO (open/mmap), TD_EFORMAT (malformed), TD_ENOMEM; a reason is
 * written into err[errlen] when err is not NULL.
 */
#ifndef TANDEM_ENGINE_SAFETENSORS_H
#define TANDEM_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define SFT_MAX_HEADER (100u << 20) /* bytes; larger headers are refused */
#define SFT_MAX_DIMS   8

enum sft_dtype {
    SFT_F32 = 0,
    SFT_F16,
    SFT_BF16,
    SFT_OTHER, /* a dtype we parse but cannot compute with (I8, F64, ...) */
};

typedef struct sft_tensor {
    const char *name; /* NUL-terminated; owned by the sft_file */
    enum sft_dtype dtype;
    const char *dtype_name; /* as written in the header ("F32", "I64", ...) */
    int ndim;
    int64_t shape[SFT_MAX_DIMS];
    const void *data; /* points into the mapping; valid until sft_close */
    size_t nbytes;
} sft_tensor;

typedef struct sft_file sft_file;

/* Maps path read-only and parses its header. On success *out is owned by the
 * caller (sft_close). */
int sft_open(const char *path, sft_file **out, char *err, size_t errlen);
void sft_close(sft_file *f); /* accepts NULL; invalidates every tensor pointer */

size_t sft_count(const sft_file *f);
const sft_tensor *sft_at(const sft_file *f, size_t i);
/* NULL when absent. Pointer owned by f. */
const sft_tensor *sft_find(const sft_file *f, const char *name);

/* Bytes per element: 4, 2, 2, or 0 for SFT_OTHER. */
size_t sft_dtype_size(enum sft_dtype dtype);

#endif
