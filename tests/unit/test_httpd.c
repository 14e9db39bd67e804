/* httpd: a real server on loopback, raw sockets as the client. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmocka.h>

#include "common/err.h"
#include "common/httpd.h"

static void handler(void *arg, const char *method, const char *path, httpd_response *r)
{
    (*(int *)arg)++;
    if (strcmp(path, "/metrics") == 0) {
        r->status = 200;
        r->body = strdup("tandem_up 1\n");
        r->len = strlen(r->body);
    } else {
        r->status = 404;
        r->body = strdup("not found\n");
        r->len = strlen(r->body);
    }
}

static int dial(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    return fd;
}

/* Reads until the peer closes or `want` bytes arrived or 2 s of silence. */
static size_t slurp(int fd, char *buf, size_t cap, size_t want)
{
    size_t n = 0;
    while (n < cap - 1 && n < want) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 2000) <= 0) break;
        ssize_t r = read(fd, buf + n, cap - 1 - n);
        if (r <= 0) break;
        n += (size_t)r;
    }
    buf[n] = '\0';
    return n;
}

static size_t count(const char *hay, const char *needle)
{
    size_t k = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        k++;
    return k;
}

static void test_requests(void **state)
{
    (void)state;
    int calls = 0;
    httpd *h = NULL;
    assert_int_equal(httpd_start("127.0.0.1:0", handler, &calls, &h), 0);
    int port = httpd_port(h);
    assert_true(port > 0);
    char buf[65536];

    /* Keep-alive, two pipelined requests answered in order. */
    int fd = dial(port);
    const char *two =
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n";
    assert_int_equal(write(fd, two, strlen(two)), (ssize_t)strlen(two));
    slurp(fd, buf, sizeof(buf), 200);
    char *a = strstr(buf, "HTTP/1.1 200 OK"), *b = strstr(buf, "HTTP/1.1 404");
    assert_non_null(a);
    assert_non_null(b);
    assert_true(a < b);
    assert_non_null(strstr(buf, "tandem_up 1\n"));
    close(fd);

    /* Connection: close is honoured: the server closes after the answer. */
    fd = dial(port);
    const char *cl = "GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
    assert_int_equal(write(fd, cl, strlen(cl)), (ssize_t)strlen(cl));
    size_t n = slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_true(n > 0);
    assert_int_equal(count(buf, "HTTP/1.1 "), 1);
    close(fd);

    /* A body is refused, other methods too, garbage is a 400. */
    fd = dial(port);
    const char *post = "POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
    assert_int_equal(write(fd, post, strlen(post)), (ssize_t)strlen(post));
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "HTTP/1.1 413"));
    close(fd);
    fd = dial(port);
    const char *del = "DELETE /metrics HTTP/1.1\r\n\r\n";
    assert_int_equal(write(fd, del, strlen(del)), (ssize_t)strlen(del));
    slurp(fd, buf, sizeof(buf), 40);
    assert_non_null(strstr(buf, "HTTP/1.1 405"));
    close(fd);
    fd = dial(port);
    const char *junk = "\x01\x02 garbage\r\n\r\n";
    assert_int_equal(write(fd, junk, strlen(junk)), (ssize_t)strlen(junk));
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "HTTP/1.1 400"));
    close(fd);

    /* A head beyond 8 KiB: 431 and closed. */
    fd = dial(port);
    char big[12000];
    int k = snprintf(big, sizeof(big), "GET /metrics HTTP/1.1\r\nX-Long: ");
    memset(big + k, 'a', sizeof(big) - (size_t)k - 1);
    big[sizeof(big) - 1] = '\0';
    (void)!write(fd, big, strlen(big));
    slurp(fd, buf, sizeof(buf), sizeof(buf));
    assert_non_null(strstr(buf, "HTTP/1.1 431"));
    close(fd);

    /* Stop with a connection still open. */
    fd = dial(port);
    httpd_stop(h);
    close(fd);
    assert_true(calls >= 2);
}

static void test_bad_address(void **state)
{
    (void)state;
    httpd *h = NULL;
    int calls = 0;
    assert_int_equal(httpd_start("nonsense", handler, &calls, &h), TD_EINVAL);
    assert_int_equal(httpd_start("127.0.0.1:99999", handler, &calls, &h), TD_EINVAL);
    assert_null(h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_requests),
        cmocka_unit_test(test_bad_address),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
