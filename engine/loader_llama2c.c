/* llama2.c checkpoints ("legacy" export, version 0):
 *   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
 *   (vocab_size < 0 means the classifier is stored separately, at the end)
 *   then float32 arrays, each for all layers back to back:
 *   token_embedding[vocab][dim], rms_att[L][dim], wq[L][dim][dim],
 *   wk[L][kv_dim][dim], wv[L][kv_dim][dim], wo[L][dim][dim], rms_ffn[L][dim],
 *   w1[L][hidden][dim], w2[L][dim][hidden], w3[L][hidden][dim], rms_final[dim],
 *   freq_cis_real[seq_len][head_size/2], freq_cis_imag[same] (unused: we compute
 *   RoPE ourselves), and wcls[vocab][dim] only when untied.
 * RoPE rotates adjacent pairs (2i, 2i+1). */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/err.h"
#include "engine/model_internal.h"

#define L2C_HEADER_BYTES 28
#define L2C_MAGIC        0x616b3432 /* "ak42": the versioned export, not supported */

int mdl__load_llama2c(const char *path, mdl_model *m, char *err, size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return td_err_fail(err, errlen, td_err_from_errno(e), "cannot open %s: %s", path,
                           strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return td_err_fail(err, errlen, TD_EIO, "cannot stat %s", path);
    }
    size_t fbytes = (size_t)st.st_size;
    if (fbytes < L2C_HEADER_BYTES) {
        close(fd);
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "llama2.c checkpoint %s is truncated: %zu bytes, header needs %d", path,
                           fbytes, L2C_HEADER_BYTES);
    }
    void *map = mmap(NULL, fbytes, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED)
        return td_err_fail(err, errlen, TD_EIO, "mmap %s: %s", path, strerror(errno));
    m->storage->map = map;
    m->storage->map_bytes = fbytes;

    int32_t h[7];
    memcpy(h, map, sizeof(h));
    if ((uint32_t)h[0] == L2C_MAGIC)
        return td_err_fail(err, errlen, TD_EUNSUPPORTED,
                           "%s is a versioned llama2.c export (magic ak42); only the legacy "
                           "(version 0) format is supported",
                           path);
    mdl_config *c = &m->cfg;
    snprintf(c->arch, sizeof(c->arch), "llama2.c");
    c->format = MDL_FORMAT_LLAMA2C;
    c->dim = h[0];
    c->hidden_dim = h[1];
    c->n_layers = h[2];
    c->n_heads = h[3];
    c->n_kv_heads = h[4];
    c->tied_output = h[5] > 0;
    c->vocab_size = h[5] > 0 ? h[5] : (h[5] == INT32_MIN ? 0 : -h[5]);
    c->max_seq_len = h[6];
    c->head_dim = (c->n_heads > 0 && c->dim % c->n_heads == 0) ? c->dim / c->n_heads : 0;
    c->rope_layout = MDL_ROPE_ADJACENT;
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    c->bos_id = 1;
    c->eos_id = 2;
    int rc = mdl__check_config(c, err, errlen);
    if (rc != 0) return rc;

    /* Sizes in floats; mdl__check_config bounds each factor so no product overflows. */
    size_t d = (size_t)c->dim, hd = (size_t)c->hidden_dim, L = (size_t)c->n_layers;
    size_t kvd = (size_t)c->n_kv_heads * c->head_dim, V = (size_t)c->vocab_size;
    size_t off = 0;
    size_t o_emb = off;
    off += V * d;
    size_t o_rms_att = off;
    off += L * d;
    size_t o_wq = off;
    off += L * d * d;
    size_t o_wk = off;
    off += L * kvd * d;
    size_t o_wv = off;
    off += L * kvd * d;
    size_t o_wo = off;
    off += L * d * d;
    size_t o_rms_ffn = off;
    off += L * d;
    size_t o_w1 = off;
    off += L * hd * d;
    size_t o_w2 = off;
    off += L * d * hd;
    size_t o_w3 = off;
    off += L * hd * d;
    size_t o_final = off;
    off += d;
    size_t need = off;
    size_t o_cls = 0;
    if (!c->tied_output) {
        off += 2 * (size_t)c->max_seq_len * (c->head_dim / 2); /* freq_cis_real, _imag */
        o_cls = off;
        off += V * d;
        need = off;
    }
    size_t avail = (fbytes - L2C_HEADER_BYTES) / sizeof(float);
    if (need > avail)
        return td_err_fail(err, errlen, TD_EFORMAT,
                           "llama2.c checkpoint %s is truncated: %zu bytes, its header "
                           "(dim %d, %d layers, vocab %d) needs %zu",
                           path, fbytes, c->dim, c->n_layers, c->vocab_size,
                           L2C_HEADER_BYTES + need * sizeof(float));

    const float *w = (const float *)((const char *)map + L2C_HEADER_BYTES);
    m->layers = calloc(L, sizeof(*m->layers));
    if (!m->layers) return td_err_fail(err, errlen, TD_ENOMEM, "out of memory");
    m->tok_embed = w + o_emb;
    for (size_t l = 0; l < L; l++) {
        mdl_layer *ly = &m->layers[l];
        ly->attn_norm = w + o_rms_att + l * d;
        ly->wq = w + o_wq + l * d * d;
        ly->wk = w + o_wk + l * kvd * d;
        ly->wv = w + o_wv + l * kvd * d;
        ly->wo = w + o_wo + l * d * d;
        ly->ffn_norm = w + o_rms_ffn + l * d;
        ly->w_gate = w + o_w1 + l * hd * d;
        ly->w_down = w + o_w2 + l * d * hd;
        ly->w_up = w + o_w3 + l * hd * d;
    }
    m->final_norm = w + o_final;
    m->output = c->tied_output ? m->tok_embed : w + o_cls;
    return 0;
}
