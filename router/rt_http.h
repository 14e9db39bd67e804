/* The router's HTTP front end: the OpenAI-compatible API on common/httpd
 * (loop thread). */
#ifndef TANDEM_ROUTER_RT_HTTP_H
#define TANDEM_ROUTER_RT_HTTP_H

#include "router/rt.h"

/* Starts serving on c->opts->http_listen from c's loop; *port receives the
 * bound port. */
int rt_http_start(rt_ctx *c, void **out, int *port);
/* Stops accepting connections; requests in flight go on. */
void rt_http_stop_accepting(void *h);
/* Closes everything (after the loop stopped serving requests). NULL is fine. */
void rt_http_close(void *h);

#endif
