/* oai_text: a request's generated token ids -> the text that is safe to
 * send, with stop strings. Pure code, one object per request, one thread at
 * a time.
 *
 * Fed one id at a time (oai_text_push), it detokenizes incrementally
 * (tok_stream: UTF-8 split across tokens is held until complete) and holds
 * back text that could be the beginning of a stop string until it is
 * decided. When a stop string completes, the text before it is released and
 * the object reports stopped: the caller cancels the request downstream and
 * finishes with "stop"; later pushes return nothing. Streamed text never
 * shows any part of a stop string. When the worker finishes the request,
 * oai_text_finish releases what was held. When two stop strings could match,
 * the first to complete wins, cut at the earliest place it occurs.
 *
 *   state      push(id)                              finish()
 *   RUNNING    text before any possible stop prefix   held text, -> DONE
 *              stop completes: text before it, -> STOPPED
 *   STOPPED    nothing                               nothing, -> DONE
 *   DONE       nothing                               nothing
 */
#ifndef TANDEM_ROUTER_OAI_TEXT_H
#define TANDEM_ROUTER_OAI_TEXT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tokenizer/tok.h"

typedef struct oai_text oai_text;

/* tok must outlive the object. stops[0..n_stops): NUL-terminated stop
 * strings, copied (empty ones are ignored). skip_ids[0..n_skip): ids that
 * are never detokenized (EOS, stop token ids: the worker reports them through
 * the finish reason), copied. On success *out is the caller's
 * (oai_text_free). TD_EINVAL, TD_ENOMEM. */
int oai_text_create(const tok_tokenizer *tok, const char *const *stops, size_t n_stops,
                    const int32_t *skip_ids, size_t n_skip, oai_text **out);
void oai_text_free(oai_text *t); /* accepts NULL */

/* Feeds one generated id. *out / *len: the text now safe to send (may be
 * empty; valid UTF-8, not NUL-terminated; points into t, valid until the
 * next call on t). *stopped: set to true when a stop string matched (now or
 * earlier). TD_ERANGE for an id outside the vocabulary (nothing consumed),
 * TD_ENOMEM. */
int oai_text_push(oai_text *t, int32_t id, const char **out, size_t *len, bool *stopped);

/* The request finished at the worker: releases what was held (incomplete
 * UTF-8 as U+FFFD, a stop string's beginning that never completed).
 * *out / *len as for push. */
int oai_text_finish(oai_text *t, const char **out, size_t *len);

/* All text released so far: *len bytes that point into t, valid until the
 * next call on t; NUL-terminated once stopped or finished. After
 * oai_text_finish, the completion's text for a unary response. */
const char *oai_text_all(const oai_text *t, size_t *len);

/* Tokens pushed so far (skipped ids included; pushes after a stop are not). */
size_t oai_text_tokens(const oai_text *t);

#endif
