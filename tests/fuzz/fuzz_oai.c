/* fuzz_oai: the router's OpenAI request parser (router/oai.c) and its
 * --chat-template reader on arbitrary bytes.
 *
 * Input: one control byte, then the bytes. Control bit 0: 0 = a completions
 * body, 1 = a chat body. Oracles: oai_parse returns 0 or TD_EINVAL; a refusal
 * is a 400 whose error JSON parses; an accepted request holds fields in
 * their documented ranges, and a response built from its text parses as
 * JSON with the text intact. The same bytes as a --chat-template file are
 * accepted or refused with a reason. */
#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/err.h"
#include "router/oai.h"

static void check_json(char *s)
{
    if (s == NULL) abort();
    cJSON *j = cJSON_Parse(s);
    if (j == NULL) abort();
    cJSON_Delete(j);
    free(s);
}

static void check_request(const oai_request *r)
{
    if (r->model == NULL || r->model[0] == '\0') abort();
    if (r->kind == OAI_CHAT) {
        if (r->n_messages == 0 || r->messages == NULL) abort();
    } else if ((r->prompt == NULL) == (r->prompt_ids == NULL)) {
        abort();
    }
    if (r->prompt && (r->prompt_len == 0 || strlen(r->prompt) != r->prompt_len)) abort();
    for (size_t i = 0; i < r->n_prompt_ids; i++)
        if (r->prompt_ids[i] < 0) abort();
    if (r->max_tokens < 0 || r->max_tokens > OAI_MAX_TOKENS_LIMIT) abort();
    if (r->min_tokens < 0 || (r->max_tokens > 0 && r->min_tokens > r->max_tokens)) abort();
    if (!(r->temperature >= 0 && r->temperature <= 2)) abort();
    if (!(r->top_p > 0 && r->top_p <= 1) || r->top_k < 0) abort();
    if (r->n_stop > OAI_MAX_STOPS) abort();
    for (size_t i = 0; i < r->n_stop; i++)
        if (r->stop[i][0] == '\0') abort();

    /* Text from the request, echoed in a response, stays intact. */
    const char *text = r->prompt ? r->prompt : r->kind == OAI_CHAT ? r->messages[0].content : "";
    oai_meta m = {r->kind, "id", r->model, 0, r->include_usage};
    oai_usage u = {1, 2};
    char *s = oai_completion_json(&m, text, strlen(text), OAI_FINISH_STOP, &u, NULL);
    if (s == NULL) abort();
    cJSON *j = cJSON_Parse(s);
    if (j == NULL) abort();
    const cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(j, "choices"), 0);
    const cJSON *t = cJSON_GetObjectItem(c0, "text");
    if (!cJSON_IsString(t) || strcmp(t->valuestring, text) != 0) abort();
    cJSON_Delete(j);
    free(s);
    check_json(oai_chunk_json(&m, text, strlen(text), true, OAI_FINISH_NONE, NULL));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0) return 0;
    enum oai_kind kind = (data[0] & 1) ? OAI_CHAT : OAI_COMPLETIONS;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    oai_request r;
    oai_error e;
    int rc = oai_parse(kind, body, len, &r, &e);
    if (rc == 0) {
        check_request(&r);
    } else {
        if (rc != TD_EINVAL || e.status != 400) abort();
        check_json(oai_error_json(&e));
    }

    /* The bytes as a --chat-template file. */
    char *tpl = malloc(len + 1);
    if (tpl == NULL) abort();
    memcpy(tpl, body, len);
    tpl[len] = '\0';
    char why[128];
    rc = oai_chat_template_check(tpl, why, sizeof(why));
    if (rc != 0 && (rc != TD_EFORMAT || why[0] == '\0')) abort();
    free(tpl);
    oai_request_free(&r);
    return 0;
}
