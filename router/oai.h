/* oai: the OpenAI API at the router, as pure code (no I/O, no clocks, no
 * globals): request bodies in, validated requests and OpenAI-shaped error,
 * response, chunk and SSE texts out.
 *
 * A request's life at the HTTP layer:
 *
 *   oai_request r;  oai_error e;
 *   if (oai_parse(OAI_CHAT, body, len, &r, &e) != 0) -> reply e.status, oai_error_json(&e)
 *   oai_prompt_tokens(tok, chat_template, &r, &ids, &n, &e)   (chat: template, then encode)
 *   oai_check_limits(&r, ids, n, vocab, context, &e)          (400 before dispatch)
 *   oai_text_create(tok, (const char *const *)r.stop, r.n_stop, eos_and_stop_ids, k, &txt)
 *   ... dispatch; each token id from the worker goes through oai_text_push
 *       (router/oai_text.h); stopped -> cancel downstream, finish "stop" ...
 *   stream:   oai_sse_frame(oai_chunk_json(...)) per piece, then the usage chunk
 *             when r.include_usage, then OAI_SSE_DONE; a failure after the
 *             first chunk: oai_sse_error(&e) (it carries [DONE] too)
 *   unary:    oai_completion_json / oai_chat_json
 *   oai_request_free(&r);
 *
 * Every function is thread-safe (no shared state). Strings given to and
 * returned by this module are UTF-8; returned texts are malloc'd,
 * NUL-terminated, owned by the caller (free()), or NULL when out of memory.
 */
#ifndef TANDEM_ROUTER_OAI_H
#define TANDEM_ROUTER_OAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tokenizer/tok.h"

enum oai_kind {
    OAI_COMPLETIONS = 0, /* POST /v1/completions */
    OAI_CHAT = 1,        /* POST /v1/chat/completions */
};

/* ------------------------------------------------------------------ errors */

/* An OpenAI error: the HTTP status and the body's fields. Embedded by the
 * caller (on its stack or in its request); nothing to free. */
typedef struct oai_error {
    int status;        /* HTTP status: 400, 401, 404, 405, 413, 429, 500, 503, 504 */
    char message[256]; /* human-readable, NUL-terminated (truncated to fit) */
    const char *type;  /* "invalid_request_error", ...: a static string */
    char param[64];    /* the offending field ("messages[1].content"); "" -> null */
    const char *code;  /* a static string ("model_not_found") or NULL -> null */
} oai_error;

/* Fills e. type NULL: the status's usual type (below); param NULL: none;
 * code NULL: none. type and code must be static strings (string literals). */
void oai_error_set(oai_error *e, int status, const char *type, const char *param, const char *code,
                   const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* The router's own errors, with OpenAI's types and codes:
 *   400 invalid_request_error            (oai_parse and the checks below)
 *   401 authentication_error  invalid_api_key
 *   404 invalid_request_error model_not_found (param "model") / unknown_url
 *   405 invalid_request_error method_not_allowed
 *   413 invalid_request_error request_too_large
 *   429 rate_limit_error      rate_limit_exceeded (send Retry-After too)
 *   500 server_error
 *   503 server_error          service_unavailable (no worker ready)
 *   504 server_error          timeout (the request's deadline passed) */
void oai_error_auth(oai_error *e);                     /* 401: missing or wrong key */
void oai_error_model(oai_error *e, const char *model); /* 404: unknown model */
void oai_error_path(oai_error *e, const char *method, const char *path);   /* 404 */
void oai_error_method(oai_error *e, const char *method, const char *path); /* 405 */
void oai_error_too_large(oai_error *e, size_t limit); /* 413: body over limit bytes */
void oai_error_busy(oai_error *e, int retry_after_s); /* 429 */
void oai_error_unavailable(oai_error *e);             /* 503 */
void oai_error_timeout(oai_error *e);                 /* 504 */

/* {"error":{"message":..,"type":..,"param":..|null,"code":..|null}} */
char *oai_error_json(const oai_error *e);

/* ---------------------------------------------------------------- requests */

#define OAI_MAX_STOPS                      4 /* stop: at most this many strings (OpenAI's limit) */
#define OAI_MAX_STOP_BYTES                 1024      /* each stop string at most this long */
#define OAI_MAX_TOKENS_LIMIT               (1 << 24) /* max_tokens above this is a 400 */
#define OAI_COMPLETIONS_DEFAULT_MAX_TOKENS 16        /* OpenAI's default for /v1/completions */

typedef struct oai_message {
    char *role;    /* "system", "user", "assistant" or "tool" ("developer" reads as system) */
    char *content; /* the text (a list of text parts joined with "\n"); "" for a null
                      assistant content */
} oai_message;

/* A validated request. Every pointer is malloc'd and owned by the request:
 * oai_request_free releases them. Absent fields hold the defaults noted. */
typedef struct oai_request {
    enum oai_kind kind;
    char *model; /* required */

    /* Completions: the prompt is text (prompt != NULL, prompt_len bytes,
     * non-empty) or token ids (prompt_ids != NULL, n_prompt_ids >= 1, each
     * >= 0; the vocabulary is checked by oai_check_limits). Chat: both NULL. */
    char *prompt;
    size_t prompt_len;
    int32_t *prompt_ids;
    size_t n_prompt_ids;

    /* Chat: n_messages >= 1. Completions: NULL, 0. */
    oai_message *messages;
    size_t n_messages;

    bool stream;        /* false */
    bool include_usage; /* stream_options.include_usage (read only when stream); false */
    int max_tokens;     /* max_completion_tokens, else max_tokens, 1..OAI_MAX_TOKENS_LIMIT;
                           not given: chat 0 (up to the context), completions
                           OAI_COMPLETIONS_DEFAULT_MAX_TOKENS (or min_tokens if more) */
    int min_tokens;     /* 0; never above max_tokens when that is given */
    float temperature;  /* 0..2; 1 (0 = greedy) */
    float top_p;        /* (0, 1]; 1 */
    int top_k;          /* 0 = off (-1 is read as 0); else > 0 */
    bool has_seed;
    uint64_t seed;             /* only when has_seed; a negative seed is taken modulo 2^64 */
    char *stop[OAI_MAX_STOPS]; /* n_stop non-empty strings */
    size_t n_stop;
    bool ignore_eos;   /* false */
    char *user;        /* NULL when absent */
    bool want_timings; /* "tandem": {"timings": true} */
} oai_request;

/* Parses and validates a request body (body[0..len), need not be
 * NUL-terminated; the caller keeps it). On success returns 0 and *out holds
 * the request (oai_request_free). Otherwise *out is zeroed (safe to free),
 * err holds the reply (400 naming the field; 500 when out of memory) and
 * the return is TD_EINVAL (or TD_ENOMEM).
 * Unknown fields are ignored; known fields this server does not implement
 * (n > 1, logprobs, top_logprobs, tools, tool_choice, functions,
 * function_call, logit_bias, best_of > 1, echo, suffix, response_format other
 * than text, non-zero presence_penalty / frequency_penalty) are a 400 naming
 * them. JSON null reads as absent. */
int oai_parse(enum oai_kind kind, const char *body, size_t len, oai_request *out, oai_error *err);
void oai_request_free(oai_request *r); /* accepts NULL and zeroed requests */

/* -------------------------------------------------------- chat templates */

/* --chat-template FILE, for a model whose tokenizer has no known template.
 * The router reads the file and passes its text. Lines "key: value"; blank
 * lines and lines starting with '#' are skipped. Either
 *
 *   family: llama3          (or llama2, chatml: the tokenizer library's template)
 *
 * or a template of one's own, from these keys:
 *
 *   begin:      text at the start of the prompt
 *   system:     text for each system message      (likewise user:, assistant:, tool:)
 *   message:    text for a message whose role has no key of its own
 *   generation: text after the last message, where the reply begins
 *
 * A value is the rest of the line after the colon and one optional space,
 * with \n, \t and \\ unescaped; in it {content}, {role}, {bos} and {eos}
 * become the message's content, its role and the tokenizer's BOS / EOS
 * spelling. A message whose role has no text is a 400. Phi-3, for example:
 *
 *   begin: {bos}
 *   system: <|system|>\n{content}<|end|>\n
 *   user: <|user|>\n{content}<|end|>\n
 *   assistant: <|assistant|>\n{content}<|end|>\n
 *   generation: <|assistant|>\n
 *
 * Checks a template's text at start-up: 0, or TD_EFORMAT with the line and
 * the reason in err[errlen]. */
int oai_chat_template_check(const char *text, char *errbuf, size_t errlen);

/* Renders r's messages into *prompt_text (malloc'd, caller frees) with
 * template_override (a template's text as above; NULL: the tokenizer's own),
 * ending where the assistant's reply begins. Encode it with
 * TOK_PARSE_SPECIAL and without TOK_ADD_BOS (oai_prompt_tokens does).
 * Errors: TD_EUNSUPPORTED (no template: 400 "start the router with
 * --chat-template"), TD_EINVAL (messages the template refuses, a malformed
 * override: 400), TD_ENOMEM (500); err filled. */
int oai_render_chat(const tok_tokenizer *tok, const char *template_override, const oai_request *r,
                    char **prompt_text, oai_error *err);

/* The prompt's token ids, malloc'd into *ids (caller frees), *n_ids long:
 * chat -> oai_render_chat + encode; completion text -> encode (BOS when the
 * tokenizer adds one, special-token text recognised, as Hugging Face does);
 * completion ids -> copied as given. Errors as oai_render_chat. */
int oai_prompt_tokens(const tok_tokenizer *tok, const char *template_override, const oai_request *r,
                      int32_t **ids, size_t *n_ids, oai_error *err);

/* What oai_parse cannot know: token ids inside the vocabulary (vocab_size >
 * 0), a prompt of at least one token that leaves room in the context
 * (context_len > 0: n_prompt_tokens < context_len, and n_prompt_tokens +
 * max_tokens <= context_len when max_tokens is given). 0 or TD_EINVAL with a
 * 400 in err (code "context_length_exceeded" for the context). */
int oai_check_limits(const oai_request *r, const int32_t *ids, size_t n_prompt_tokens,
                     int vocab_size, int context_len, oai_error *err);

/* --------------------------------------------------------------- responses */

enum oai_finish {
    OAI_FINISH_NONE = 0, /* still running: finish_reason null */
    OAI_FINISH_STOP,     /* "stop": EOS, a stop token or a stop string */
    OAI_FINISH_LENGTH,   /* "length": max_tokens or the context */
};
const char *oai_finish_name(enum oai_finish f); /* "stop", "length", NULL for NONE */

/* What every response and chunk of one request shares. The strings are the
 * caller's and must live through the call. */
typedef struct oai_meta {
    enum oai_kind kind;
    const char *id;     /* from oai_make_id */
    const char *model;  /* the served model name */
    int64_t created;    /* Unix seconds at arrival */
    bool include_usage; /* streams: chunks carry "usage": null before the usage chunk */
} oai_meta;

/* "cmpl-<request_id>" or "chatcmpl-<request_id>" into out[cap] (truncated to
 * fit, NUL-terminated): the id the client sees carries the router's id. */
void oai_make_id(enum oai_kind kind, const char *request_id, char *out, size_t cap);

typedef struct oai_usage {
    uint64_t prompt_tokens;
    uint64_t completion_tokens; /* total_tokens is their sum */
} oai_usage;

/* The Timings message of proto/tandem.proto, in microseconds (0 = not
 * measured); returned as "tandem":{"timings":{"queue_us":..,...}} when the
 * request asked (want_timings). */
typedef struct oai_timings {
    uint64_t queue_us, tokenize_us, prefill_us, transfer_us, first_token_us, decode_us,
        prefill_queue_us, e2e_us;
} oai_timings;

/* Unary responses. text[0..len) is the whole generated text (valid UTF-8);
 * timings NULL: no "tandem" member.
 *   completion: {"id","object":"text_completion","created","model",
 *                "choices":[{"index":0,"text","logprobs":null,"finish_reason"}],
 *                "usage":{"prompt_tokens","completion_tokens","total_tokens"}}
 *   chat:       {"id","object":"chat.completion","created","model",
 *                "choices":[{"index":0,"message":{"role":"assistant","content"},
 *                            "logprobs":null,"finish_reason"}],"usage":{...}} */
char *oai_completion_json(const oai_meta *m, const char *text, size_t len, enum oai_finish finish,
                          const oai_usage *usage, const oai_timings *timings);
char *oai_chat_json(const oai_meta *m, const char *text, size_t len, enum oai_finish finish,
                    const oai_usage *usage, const oai_timings *timings);

/* One streamed chunk of m->kind. text[0..len) (len 0 allowed) is the new
 * text; finish NONE gives "finish_reason": null. first (chat): the delta
 * carries "role":"assistant" (send it on the first chunk). Chat deltas hold
 * "content" unless len == 0 and not first ({} then, as on OpenAI's last
 * chunk). timings: on the last chunk when asked and no usage chunk follows,
 * else NULL.
 *   completion: {"id","object":"text_completion","created","model",
 *                "choices":[{"index":0,"text","logprobs":null,"finish_reason"}]}
 *   chat:       {"id","object":"chat.completion.chunk","created","model",
 *                "choices":[{"index":0,"delta":{"role"?,"content"?},"logprobs":null,
 *                            "finish_reason"}]} */
char *oai_chunk_json(const oai_meta *m, const char *text, size_t len, bool first,
                     enum oai_finish finish, const oai_timings *timings);

/* The last chunk of a stream with include_usage: "choices":[] and "usage". */
char *oai_usage_chunk_json(const oai_meta *m, const oai_usage *usage, const oai_timings *timings);

/* Server-Sent Events framing: "data: <json>\n\n" (malloc'd). */
char *oai_sse_frame(const char *json);
#define OAI_SSE_DONE "data: [DONE]\n\n"
/* A stream that fails after its first chunk ends with this (malloc'd):
 * "data: {\"error\":{...}}\n\ndata: [DONE]\n\n". */
char *oai_sse_error(const oai_error *e);

#endif
