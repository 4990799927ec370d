/*
 * sse_client.c - an epoll Server-Sent Events load client for the Chorus benchmark.
 *
 * One thread, one epoll set, N non-blocking connections to 127.0.0.1:PORT. Each
 * connection sends one `GET <path>` (optionally with Last-Event-ID), de-chunks the HTTP/1.1
 * response body (Transfer-Encoding: chunked, or a plain body), splits it into SSE lines
 * (CR, LF or CRLF, split anywhere) and dispatches events as the WHATWG algorithm does on a
 * blank line. It counts `answer` events, checks that `id:`s go up by exactly one, and turns
 * the `t=<CLOCK_MONOTONIC seconds>;` stamp the mock puts at the start of each answer's
 * content into a publish-to-receive latency histogram.
 *
 * It is meant not to be the bottleneck: one 256 KiB read buffer shared by every connection
 * (the bytes are parsed straight out of it), a per-connection state of a few hundred
 * bytes (a data line is kept only up to LINE_KEEP bytes, enough to find the stamp), the
 * clock read once per read() rather than once per event, no allocation per event.
 *
 * Protocol with the harness (bench/run.py), one JSON object per line on stdout:
 *   {"phase":"ready",...}     every main connection has had its first event (or failed);
 *                             churn (if any) starts now.
 *   {"phase":"finished",...}  the summary: every main connection saw `done`/`end` (or failed),
 *                             or --until ready was reached, or a timeout hit.
 * With --pause the client then waits (at most 120 s) for a line or EOF on stdin before it
 * closes its connections, so the harness can sample the server's CPU time and memory
 * while every subscriber is still attached. Errors go to stderr; exit status 2 on bad usage.
 *
 * Build: gcc -O2 -Wall -Wextra -o sse_client sse_client.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define READ_BUF (256 * 1024)
#define HDR_MAX 4096     /* response headers larger than this fail the connection */
#define LINE_KEEP 256    /* bytes of each SSE line kept; the rest is skipped (not needed) */
#define NAME_MAX_LEN 31  /* event names are short: turn, answer, done, error, end, snapshot */
#define MAX_EVENTS 1024  /* epoll_wait batch */
#define MAX_PATHS 100000
#define PAUSE_MAX_MS 120000

/* Latency histogram: 10 us buckets up to 1 s, then 10 ms buckets up to 100 s (so a server
 * that falls far behind still gets a real p99, not just "over 1 s"), then one overflow. */
#define FINE_US 10
#define FINE_N 100000            /* 100000 x 10 us = 1 s */
#define COARSE_US 10000
#define COARSE_N 9900            /* 1 s + 9900 x 10 ms = 100 s */

enum conn_state { ST_CONNECTING, ST_SENDING, ST_HEADERS, ST_BODY, ST_CLOSED };
enum chunk_state { CH_SIZE, CH_EXT, CH_DATA, CH_DATA_CR, CH_DATA_LF, CH_END };

struct conn {
    int fd;
    int index;                  /* position in the conns array (epoll data) */
    enum conn_state state;
    unsigned is_churn : 1;      /* a churn connection: closed after its first event */
    unsigned chunked : 1;       /* Transfer-Encoding: chunked */
    unsigned prev_cr : 1;       /* the last byte fed to the line splitter was CR */
    unsigned ev_has_id : 1, ev_has_data : 1, ev_has_stamp : 1, ev_has_name : 1;
    unsigned got_first : 1;     /* has had its first event */
    unsigned done : 1;          /* saw `done` or `end` */
    unsigned failed : 1;
    unsigned gap : 1, dup : 1;  /* an id skipped ahead / went back or repeated */
    const char *path;
    size_t sent;                /* request bytes written so far */
    /* HTTP response headers, allocated only while they are being read */
    char *hdr;
    size_t hdr_len;
    /* chunked transfer decoding */
    enum chunk_state ch;
    uint64_t chunk_left;
    /* SSE line being assembled and the event being built */
    char line[LINE_KEEP + 1];
    size_t line_len;
    char ev_name[NAME_MAX_LEN + 1];
    long long ev_id;
    double ev_stamp;
    /* per-connection results */
    long long last_id;
    long long answers;
    long long events;           /* events carrying an id */
    long long snapshots;
    double t_open;              /* connect() called */
    double t_sent;              /* request fully written */
    double t_first;             /* first event dispatched */
    double t_done;              /* `done`/`end` dispatched */
};

struct options {
    int port;
    const char **paths;
    int npaths;
    int conns;
    const char *last_event_id;
    double ready_timeout;       /* start -> ready, seconds */
    double run_timeout;         /* ready -> finished, seconds */
    int max_pending;            /* main connections opened but without a first event yet */
    int sequential;             /* open connection i+1 only once connection i is done */
    int close_on_done;          /* close a main connection as soon as it is done */
    int until_ready;            /* finish at ready instead of at done */
    int pause;                  /* wait for stdin after printing the summary */
    double churn_rate;          /* churn connections opened per second after ready */
    double churn_seconds;       /* for this long */
};

static struct options opt;
static struct conn **conns;     /* main connections first, then churn connections */
static int nconns_alloc, nconns_used;
static int epfd;
static char readbuf[READ_BUF];
static uint64_t *hist_fine, *hist_coarse, hist_over;
static uint64_t lat_count;
static double lat_max_s;
static double t_start, t_ready = -1, now_s;
static double last_event_mono = 0, max_stamp = 0;
static long long total_bytes;
static int main_opened, main_pending, main_ready, main_done, main_failed, main_finished_conns;
static int churn_opened, churn_ok, churn_failed;
static int fail_connect, fail_status, fail_eof, fail_error, fail_header;

/* ------------------------------------------------------------------------------------ */

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "sse_client: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(2);
}

static void record_latency(double seconds) {
    if (seconds < 0) seconds = 0; /* same clock, so only rounding can make it negative */
    if (seconds > lat_max_s) lat_max_s = seconds;
    lat_count++;
    uint64_t us = (uint64_t)(seconds * 1e6);
    if (us < (uint64_t)FINE_N * FINE_US) {
        hist_fine[us / FINE_US]++;
    } else {
        uint64_t over = (us - (uint64_t)FINE_N * FINE_US) / COARSE_US;
        if (over < COARSE_N) hist_coarse[over]++;
        else hist_over++;
    }
}

/* The upper edge (in us) of the bucket holding the q-quantile; -1 when there is no data. */
static double latency_quantile_us(double q) {
    if (lat_count == 0) return -1;
    uint64_t rank = (uint64_t)(q * (double)lat_count);
    if (rank >= lat_count) rank = lat_count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < FINE_N; i++) {
        seen += hist_fine[i];
        if (seen > rank) return (double)(i + 1) * FINE_US;
    }
    for (int i = 0; i < COARSE_N; i++) {
        seen += hist_coarse[i];
        if (seen > rank) return (double)FINE_N * FINE_US + (double)(i + 1) * COARSE_US;
    }
    return lat_max_s * 1e6;
}

/* ------------------------------------------------------------------------------------ */

static void conn_close(struct conn *c) {
    free(c->hdr);
    c->hdr = NULL;
    if (c->state == ST_CLOSED) return;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
}

static void conn_fail(struct conn *c, int *reason_counter) {
    if (c->failed || c->done) {
        conn_close(c);
        return;
    }
    c->failed = 1;
    if (c->is_churn) {
        churn_failed++;
    } else {
        (*reason_counter)++;
        main_failed++;
        if (!c->got_first) main_pending--;
        main_finished_conns++;
    }
    conn_close(c);
}

static struct conn *conn_open(const char *path, int is_churn) {
    if (nconns_used == nconns_alloc) {
        nconns_alloc = nconns_alloc ? nconns_alloc * 2 : 1024;
        conns = realloc(conns, (size_t)nconns_alloc * sizeof *conns);
        if (!conns) die("out of memory");
    }
    struct conn *c = calloc(1, sizeof *c);
    if (!c) die("out of memory");
    c->index = nconns_used;
    conns[nconns_used++] = c;
    c->path = path;
    c->is_churn = is_churn ? 1 : 0;
    c->last_id = opt.last_event_id ? atoll(opt.last_event_id) : 0;
    c->t_open = now_s;
    c->t_sent = -1;
    c->t_first = -1;
    c->t_done = -1;
    if (is_churn) churn_opened++;
    else {
        main_opened++;
        main_pending++;
    }

    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        fprintf(stderr, "sse_client: socket: %s\n", strerror(errno));
        c->state = ST_CLOSED; /* nothing to close; conn_fail only counts */
        conn_fail(c, &fail_connect);
        return c;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)opt.port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->state = ST_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.u32 = (uint32_t)c->index};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        conn_fail(c, &fail_connect);
    }
    return c;
}

/* Write the request (it is tiny, so it nearly always goes in one send). */
static void conn_send(struct conn *c) {
    char req[2048];
    int len;
    if (opt.last_event_id)
        len = snprintf(req, sizeof req,
                       "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
                       "Cache-Control: no-cache\r\nLast-Event-ID: %s\r\n\r\n",
                       c->path, opt.port, opt.last_event_id);
    else
        len = snprintf(req, sizeof req,
                       "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: text/event-stream\r\n"
                       "Cache-Control: no-cache\r\n\r\n",
                       c->path, opt.port);
    if (len < 0 || (size_t)len >= sizeof req) die("request too long for path %s", c->path);
    while (c->sent < (size_t)len) {
        ssize_t n = send(c->fd, req + c->sent, (size_t)len - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return; /* EPOLLOUT will call again */
            conn_fail(c, &fail_error);
            return;
        }
        c->sent += (size_t)n;
    }
    c->t_sent = now_s;
    c->state = ST_HEADERS;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)c->index};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* ------------------------------------------------------------------------------------ */
/* SSE: events, lines */

static void event_reset(struct conn *c) {
    c->ev_has_id = c->ev_has_data = c->ev_has_stamp = c->ev_has_name = 0;
    c->ev_name[0] = '\0';
}

/* A blank line: dispatch the event built so far (if any). */
static void event_dispatch(struct conn *c) {
    if (!c->ev_has_data && !c->ev_has_id && !c->ev_has_name) return; /* e.g. after retry: */
    int is_answer = c->ev_has_name && strcmp(c->ev_name, "answer") == 0;
    int is_final = c->ev_has_name &&
                   (strcmp(c->ev_name, "done") == 0 || strcmp(c->ev_name, "end") == 0);
    int is_snapshot = c->ev_has_name && strcmp(c->ev_name, "snapshot") == 0;

    if (c->ev_has_id) {
        if (is_snapshot) {
            c->snapshots++; /* a snapshot legitimately jumps ahead */
        } else if (c->ev_id == c->last_id + 1) {
            /* in order */
        } else if (c->ev_id <= c->last_id) {
            c->dup = 1;
        } else {
            c->gap = 1;
        }
        c->last_id = c->ev_id;
        c->events++;
    }
    if (is_answer) {
        c->answers++;
        if (c->ev_has_stamp) {
            record_latency(now_s - c->ev_stamp);
            if (c->ev_stamp > max_stamp) max_stamp = c->ev_stamp;
        }
    }
    if (!c->is_churn && (c->ev_has_id || is_final)) last_event_mono = now_s;

    if (!c->got_first) {
        c->got_first = 1;
        c->t_first = now_s;
        if (c->is_churn) {
            churn_ok++;
            event_reset(c);
            conn_close(c); /* a viewer who opened the page and left */
            return;
        }
        main_pending--;
        main_ready++;
    }
    if (is_final && !c->done) {
        c->done = 1;
        c->t_done = now_s;
        if (!c->is_churn) {
            main_done++;
            main_finished_conns++;
            if (opt.close_on_done) {
                event_reset(c);
                conn_close(c);
                return;
            }
        }
    }
    event_reset(c);
}

/* One complete line (without its terminator), possibly truncated to LINE_KEEP bytes. */
static void line_process(struct conn *c) {
    char *line = c->line;
    size_t len = c->line_len;
    line[len] = '\0';
    if (len == 0) {
        event_dispatch(c);
        return;
    }
    if (line[0] == ':') return; /* a comment: heartbeat */
    char *colon = memchr(line, ':', len);
    size_t name_len = colon ? (size_t)(colon - line) : len;
    char *value = colon ? colon + 1 : line + len;
    if (*value == ' ') value++;

    if (name_len == 5 && memcmp(line, "event", 5) == 0) {
        size_t vlen = strlen(value);
        if (vlen > NAME_MAX_LEN) vlen = NAME_MAX_LEN;
        memcpy(c->ev_name, value, vlen);
        c->ev_name[vlen] = '\0';
        c->ev_has_name = 1;
    } else if (name_len == 4 && memcmp(line, "data", 4) == 0) {
        c->ev_has_data = 1;
        /* The mock's stamp starts the content: {"turn":0,"choice":0,"content":"t=123.456789;...
         * It lies well within LINE_KEEP bytes of the line start. */
        const char *key = "\"content\":\"t=";
        char *at = memmem(value, strlen(value), key, strlen(key));
        if (at) {
            char *end;
            double stamp = strtod(at + strlen(key), &end);
            if (end != at + strlen(key) && *end == ';') {
                c->ev_stamp = stamp;
                c->ev_has_stamp = 1;
            }
        }
    } else if (name_len == 2 && memcmp(line, "id", 2) == 0) {
        char *end;
        long long id = strtoll(value, &end, 10);
        if (end != value && *end == '\0') {
            c->ev_id = id;
            c->ev_has_id = 1;
        }
    }
    /* retry: and unknown fields are ignored, as EventSource does. */
}

/* Feed body bytes to the line splitter. Handles CR, LF and CRLF split anywhere. */
static void sse_feed(struct conn *c, const char *p, size_t n) {
    const char *end = p + n;
    while (p < end && c->state == ST_BODY) {
        if (c->prev_cr) {
            c->prev_cr = 0;
            if (*p == '\n') { p++; continue; } /* the LF of a CRLF */
        }
        /* find the next terminator */
        const char *q = p;
        while (q < end && *q != '\n' && *q != '\r') q++;
        size_t take = (size_t)(q - p);
        if (c->line_len < LINE_KEEP) {
            size_t room = LINE_KEEP - c->line_len;
            size_t keep = take < room ? take : room;
            memcpy(c->line + c->line_len, p, keep);
            c->line_len += keep;
        }
        if (q == end) return; /* the line continues in the next read */
        c->prev_cr = (*q == '\r');
        p = q + 1;
        line_process(c);
        c->line_len = 0;
    }
}

static int hex_value(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* Feed raw response body bytes: de-chunk if chunked, then hand the payload to SSE.
 * A chunk is `<hex size>[;ext]\r\n<size bytes>\r\n`; a size of 0 ends the body. */
static void body_feed(struct conn *c, const char *p, size_t n) {
    if (!c->chunked) {
        sse_feed(c, p, n);
        return;
    }
    const char *end = p + n;
    while (p < end && c->state == ST_BODY) {
        switch (c->ch) {
        case CH_SIZE: {
            char ch = *p++;
            int digit = hex_value(ch);
            if (digit >= 0) {
                if (c->chunk_left >> 56) { conn_fail(c, &fail_error); return; } /* absurd size */
                c->chunk_left = c->chunk_left * 16 + (uint64_t)digit;
            }
            else if (ch == ';') c->ch = CH_EXT;
            else if (ch == '\r') { /* the LF follows */ }
            else if (ch == '\n') c->ch = c->chunk_left ? CH_DATA : CH_END;
            else { conn_fail(c, &fail_error); return; }
            break;
        }
        case CH_EXT:
            if (*p++ == '\n') c->ch = c->chunk_left ? CH_DATA : CH_END;
            break;
        case CH_DATA: {
            size_t avail = (size_t)(end - p);
            size_t take = c->chunk_left < avail ? (size_t)c->chunk_left : avail;
            sse_feed(c, p, take);
            p += take;
            c->chunk_left -= take;
            if (c->chunk_left == 0) c->ch = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
            if (*p == '\r') { p++; c->ch = CH_DATA_LF; }
            else if (*p == '\n') { p++; c->ch = CH_SIZE; }
            else { conn_fail(c, &fail_error); return; }
            break;
        case CH_DATA_LF:
            if (*p++ != '\n') { conn_fail(c, &fail_error); return; }
            c->ch = CH_SIZE;
            break;
        case CH_END:
            return;
        }
        if (c->ch == CH_END) {
            /* The terminating chunk: the server ended the body, as at EOF. */
            if (c->done) conn_close(c);
            else conn_fail(c, &fail_eof);
            return;
        }
    }
}

/* Whether the header block (lower-cased, NUL-terminated) says Transfer-Encoding: chunked. */
static int is_chunked(char *headers) {
    const char *name = "\r\ntransfer-encoding:";
    char *te = strstr(headers, name);
    if (!te) return 0;
    char *value = te + strlen(name);
    char *eol = strstr(value, "\r\n");
    if (eol) *eol = '\0';
    return strstr(value, "chunked") != NULL;
}

/* Accumulate the response headers; once complete, check the status and the framing. */
static void headers_feed(struct conn *c, const char *p, size_t n) {
    if (!c->hdr && !(c->hdr = malloc(HDR_MAX))) die("out of memory");
    size_t room = HDR_MAX - 1 - c->hdr_len;
    size_t take = n < room ? n : room;
    memcpy(c->hdr + c->hdr_len, p, take);
    size_t old_len = c->hdr_len;
    c->hdr_len += take;
    c->hdr[c->hdr_len] = '\0';
    char *blank = strstr(c->hdr, "\r\n\r\n");
    if (!blank) {
        if (c->hdr_len >= HDR_MAX - 1) conn_fail(c, &fail_header);
        return;
    }
    size_t header_bytes = (size_t)(blank - c->hdr) + 4;
    if (strncmp(c->hdr, "HTTP/1.1 200", 12) != 0 && strncmp(c->hdr, "HTTP/1.0 200", 12) != 0) {
        if (!c->is_churn && fail_status < 5) { /* say why, but do not flood stderr */
            c->hdr[strcspn(c->hdr, "\r\n")] = '\0';
            fprintf(stderr, "sse_client: GET %s -> %s\n", c->path, c->hdr);
        }
        conn_fail(c, &fail_status);
        return;
    }
    /* Header names are case-insensitive: lower-case the block, then look. */
    for (char *h = c->hdr; h < blank; h++)
        if (*h >= 'A' && *h <= 'Z') *h = (char)(*h - 'A' + 'a');
    blank[2] = '\0'; /* keep the CRLF that ends the last header line */
    c->chunked = is_chunked(c->hdr) ? 1 : 0;
    free(c->hdr);
    c->hdr = NULL;
    c->state = ST_BODY;
    c->ch = CH_SIZE;
    c->chunk_left = 0;
    /* The bytes after the headers in this read are body. */
    size_t body_from = header_bytes - old_len; /* offset into p */
    if (body_from < n) body_feed(c, p + body_from, n - body_from);
}

static void conn_readable(struct conn *c) {
    ssize_t n = read(c->fd, readbuf, sizeof readbuf);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        conn_fail(c, &fail_error);
        return;
    }
    if (n == 0) {
        /* The server closed. Fine once done (e.g. after `end`), a failure before. */
        if (c->done || (c->is_churn && c->got_first)) conn_close(c);
        else conn_fail(c, &fail_eof);
        return;
    }
    total_bytes += n;
    if (c->state == ST_HEADERS) headers_feed(c, readbuf, (size_t)n);
    else if (c->state == ST_BODY) body_feed(c, readbuf, (size_t)n);
}

static void conn_event(struct conn *c, uint32_t events) {
    if (c->state == ST_CLOSED) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err != 0) {
            conn_fail(c, &fail_connect);
            return;
        }
        if (!(events & (EPOLLOUT | EPOLLIN))) {
            if (events & (EPOLLERR | EPOLLHUP)) conn_fail(c, &fail_connect);
            return;
        }
        c->state = ST_SENDING;
    }
    if (c->state == ST_SENDING) {
        conn_send(c);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) conn_readable(c);
}

/* ------------------------------------------------------------------------------------ */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

enum spread_of { FIRST_EVENT, DONE, CONNECT, CHURN_FIRST_EVENT };

/* min / median / max over the main connections of: request sent -> first event,
 * request sent -> done, or connect() -> request sent; or over the churn connections of
 * connect() -> first event. -1 when no connection has it. */
static void spread(enum spread_of which, double out[3]) {
    double *v = malloc(sizeof(double) * (size_t)(nconns_used ? nconns_used : 1));
    if (!v) die("out of memory");
    int k = 0;
    for (int i = 0; i < nconns_used; i++) {
        struct conn *c = conns[i];
        if (which == CHURN_FIRST_EVENT) {
            if (c->is_churn && c->t_first >= 0) v[k++] = c->t_first - c->t_open;
            continue;
        }
        if (c->is_churn || c->t_sent < 0) continue;
        if (which == CONNECT) v[k++] = c->t_sent - c->t_open;
        else if (which == FIRST_EVENT && c->t_first >= 0) v[k++] = c->t_first - c->t_sent;
        else if (which == DONE && c->t_done >= 0) v[k++] = c->t_done - c->t_sent;
    }
    if (k == 0) {
        out[0] = out[1] = out[2] = -1;
    } else {
        qsort(v, (size_t)k, sizeof *v, cmp_double);
        out[0] = v[0];
        out[1] = (k % 2) ? v[k / 2] : (v[k / 2 - 1] + v[k / 2]) / 2;
        out[2] = v[k - 1];
    }
    free(v);
}

static void print_ready(void) {
    printf("{\"phase\":\"ready\",\"ready\":%d,\"failed\":%d,\"t_ready_s\":%.6f}\n", main_ready,
           main_failed, t_ready - t_start);
    fflush(stdout);
}

static void print_summary(int timed_out) {
    long long amin = -1, amax = 0, atotal = 0, emin = -1, emax = 0, snaps = 0;
    int gaps = 0, dups = 0, ok = 0;
    for (int i = 0; i < nconns_used; i++) {
        struct conn *c = conns[i];
        if (c->is_churn) continue;
        atotal += c->answers;
        if (amin < 0 || c->answers < amin) amin = c->answers;
        if (c->answers > amax) amax = c->answers;
        if (emin < 0 || c->events < emin) emin = c->events;
        if (c->events > emax) emax = c->events;
        gaps += c->gap;
        dups += c->dup;
        snaps += c->snapshots;
        if (!c->failed && (opt.until_ready ? c->got_first : c->done)) ok++;
    }
    /* Connections never opened (timeout before their turn) count as 0 answers. */
    if (main_opened < opt.conns) amin = 0;
    if (amin < 0) amin = 0;
    if (emin < 0) emin = 0;
    double first[3], done[3], connect[3], churn_first[3];
    spread(FIRST_EVENT, first);
    spread(DONE, done);
    spread(CONNECT, connect);
    spread(CHURN_FIRST_EVENT, churn_first);
    printf("{\"phase\":\"finished\",\"conns\":%d,\"opened\":%d,\"ok\":%d,\"ready\":%d,"
           "\"failed\":%d,\"timed_out\":%s,",
           opt.conns, main_opened, ok, main_ready, main_failed, timed_out ? "true" : "false");
    printf("\"fail_reasons\":{\"connect\":%d,\"status\":%d,\"eof\":%d,\"error\":%d,"
           "\"header\":%d},",
           fail_connect, fail_status, fail_eof, fail_error, fail_header);
    printf("\"answers\":{\"total\":%lld,\"min\":%lld,\"max\":%lld},"
           "\"events\":{\"min\":%lld,\"max\":%lld},\"snapshots\":%lld,"
           "\"id_gap_conns\":%d,\"id_dup_conns\":%d,",
           atotal, amin, amax, emin, emax, snaps, gaps, dups);
    printf("\"latency_us\":{\"count\":%llu,\"p50\":%.0f,\"p90\":%.0f,\"p99\":%.0f,"
           "\"max\":%.0f},",
           (unsigned long long)lat_count, latency_quantile_us(0.50), latency_quantile_us(0.90),
           latency_quantile_us(0.99), lat_count ? lat_max_s * 1e6 : -1.0);
    printf("\"start_mono\":%.6f,\"ready_mono\":%.6f,\"last_event_mono\":%.6f,"
           "\"max_stamp\":%.6f,\"t_ready_s\":%.6f,\"t_finished_s\":%.6f,"
           "\"t_last_event_s\":%.6f,",
           t_start, t_ready, last_event_mono, max_stamp, t_ready >= 0 ? t_ready - t_start : -1.0,
           now_s - t_start, last_event_mono > 0 ? last_event_mono - t_start : -1.0);
    printf("\"first_event_s\":{\"min\":%.6f,\"p50\":%.6f,\"max\":%.6f},"
           "\"done_s\":{\"min\":%.6f,\"p50\":%.6f,\"max\":%.6f},"
           "\"connect_s\":{\"min\":%.6f,\"p50\":%.6f,\"max\":%.6f},",
           first[0], first[1], first[2], done[0], done[1], done[2], connect[0], connect[1],
           connect[2]);
    /* Churn: ok = got its first event (then closed); waiting = neither ok nor failed when
     * the run finished (the server had not answered it yet). */
    printf("\"bytes\":%lld,\"churn\":{\"opened\":%d,\"ok\":%d,\"failed\":%d,"
           "\"waiting\":%d,\"first_event_s\":{\"min\":%.6f,\"p50\":%.6f,\"max\":%.6f}}}\n",
           total_bytes, churn_opened, churn_ok, churn_failed,
           churn_opened - churn_ok - churn_failed, churn_first[0], churn_first[1], churn_first[2]);
    fflush(stdout);
}

static void wait_for_go(void) {
    struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
    if (poll(&p, 1, PAUSE_MAX_MS) > 0 && (p.revents & POLLIN)) {
        char buf[64];
        if (read(STDIN_FILENO, buf, sizeof buf) < 0) { /* EOF or a line: either means go */ }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: sse_client --port P (--path PATH ... | --paths-file FILE) --conns N\n"
            "  [--last-event-id ID] [--ready-timeout S=60] [--run-timeout S=60]\n"
            "  [--max-pending K=100] [--sequential] [--close-on-done] [--until done|ready]\n"
            "  [--pause] [--churn-rate R --churn-seconds T]\n"
            "Connections go round-robin over the paths. Prints JSON lines on stdout.\n");
    exit(2);
}

static void add_path(const char *p) {
    if (opt.npaths >= MAX_PATHS) die("too many paths");
    if (p[0] != '/') die("a path must start with '/': %s", p);
    opt.paths[opt.npaths++] = p;
}

static void read_paths_file(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) die("%s: %s", file, strerror(errno));
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0]) add_path(strdup(line));
    }
    fclose(f);
}

static void parse_args(int argc, char **argv) {
    opt.paths = calloc(MAX_PATHS, sizeof *opt.paths);
    if (!opt.paths) die("out of memory");
    opt.ready_timeout = 60;
    opt.run_timeout = 60;
    opt.max_pending = 100;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV() do { if (!v) usage(); i++; } while (0)
        if (!strcmp(a, "--port")) { NEEDV(); opt.port = atoi(v); }
        else if (!strcmp(a, "--path")) { NEEDV(); add_path(v); }
        else if (!strcmp(a, "--paths-file")) { NEEDV(); read_paths_file(v); }
        else if (!strcmp(a, "--conns")) { NEEDV(); opt.conns = atoi(v); }
        else if (!strcmp(a, "--last-event-id")) { NEEDV(); opt.last_event_id = v; }
        else if (!strcmp(a, "--ready-timeout")) { NEEDV(); opt.ready_timeout = atof(v); }
        else if (!strcmp(a, "--run-timeout")) { NEEDV(); opt.run_timeout = atof(v); }
        else if (!strcmp(a, "--max-pending")) { NEEDV(); opt.max_pending = atoi(v); }
        else if (!strcmp(a, "--sequential")) opt.sequential = 1;
        else if (!strcmp(a, "--close-on-done")) opt.close_on_done = 1;
        else if (!strcmp(a, "--pause")) opt.pause = 1;
        else if (!strcmp(a, "--until")) {
            NEEDV();
            if (!strcmp(v, "ready")) opt.until_ready = 1;
            else if (strcmp(v, "done")) usage();
        }
        else if (!strcmp(a, "--churn-rate")) { NEEDV(); opt.churn_rate = atof(v); }
        else if (!strcmp(a, "--churn-seconds")) { NEEDV(); opt.churn_seconds = atof(v); }
        else usage();
#undef NEEDV
    }
    if (opt.port <= 0 || opt.port > 65535 || opt.npaths == 0 || opt.conns <= 0) usage();
    if (opt.max_pending < 1) opt.max_pending = 1;
    if (opt.ready_timeout <= 0 || opt.run_timeout <= 0) usage();
    if (opt.last_event_id) {
        for (const char *p = opt.last_event_id; *p; p++)
            if (*p < '0' || *p > '9') die("--last-event-id must be digits");
    }
}

/* Raise the soft fd limit to the hard limit: N connections need N descriptors. */
static void raise_fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 &&
        (rlim_t)opt.conns + 64 > rl.rlim_cur)
        fprintf(stderr, "sse_client: warning: %d connections but the fd limit is %llu\n",
                opt.conns, (unsigned long long)rl.rlim_cur);
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    raise_fd_limit();
    hist_fine = calloc(FINE_N, sizeof *hist_fine);
    hist_coarse = calloc(COARSE_N, sizeof *hist_coarse);
    if (!hist_fine || !hist_coarse) die("out of memory");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1: %s", strerror(errno));

    t_start = now_s = mono_now();
    int next_path = 0;
    int timed_out = 0;
    long long churn_next = 0; /* index of the next churn connection to open */
    struct epoll_event events[MAX_EVENTS];

    /* The loop is bounded by the two timeouts: it ends at finish, or at ready_timeout
     * before ready, or at run_timeout after it. */
    for (;;) {
        now_s = mono_now();

        /* Open main connections, keeping at most max_pending without a first event. More
         * than the server's listen backlog (aiohttp's default is 128) in flight and the
         * kernel drops SYNs: the connect is retried after 1 s, and that second is not the
         * server's fan-out. */
        while (main_opened < opt.conns) {
            if (opt.sequential) {
                if (main_opened > main_finished_conns) break;
            } else if (main_pending >= opt.max_pending) {
                break;
            }
            conn_open(opt.paths[next_path], 0);
            next_path = (next_path + 1) % opt.npaths;
        }

        if (t_ready < 0 && main_ready + main_failed >= opt.conns) {
            t_ready = now_s;
            print_ready();
        }

        /* Churn: after ready, open churn_rate connections per second for churn_seconds. */
        double churn_wait = -1;
        if (t_ready >= 0 && opt.churn_rate > 0) {
            long long total = (long long)(opt.churn_rate * opt.churn_seconds);
            while (churn_next < total && t_ready + (double)churn_next / opt.churn_rate <= now_s) {
                conn_open(opt.paths[(int)(churn_next % opt.npaths)], 1);
                churn_next++;
            }
            if (churn_next < total)
                churn_wait = t_ready + (double)churn_next / opt.churn_rate - now_s;
        }

        int finished = opt.until_ready ? (t_ready >= 0)
                                       : (main_finished_conns >= opt.conns);
        if (finished) break;
        double deadline = t_ready < 0 ? t_start + opt.ready_timeout : t_ready + opt.run_timeout;
        if (now_s >= deadline) {
            timed_out = 1;
            break;
        }

        double wait_s = deadline - now_s;
        if (churn_wait >= 0 && churn_wait < wait_s) wait_s = churn_wait;
        if (wait_s > 0.1) wait_s = 0.1;
        int timeout_ms = (int)(wait_s * 1000) + 1;
        int n = epoll_wait(epfd, events, MAX_EVENTS, timeout_ms);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait: %s", strerror(errno));
        }
        now_s = mono_now(); /* one clock read per batch: all of it arrived "now" */
        for (int i = 0; i < n; i++) {
            struct conn *c = conns[events[i].data.u32];
            conn_event(c, events[i].events);
        }
    }

    now_s = mono_now();
    print_summary(timed_out);
    if (opt.pause) wait_for_go();
    for (int i = 0; i < nconns_used; i++) {
        conn_close(conns[i]);
        free(conns[i]);
    }
    free(conns);
    free(hist_fine);
    free(hist_coarse);
    close(epfd);
    return 0;
}
