/* Test tooling for streamops-localnode (not product).
 *
 * LD_PRELOAD shim that gives each pod its own port space on loopback: a bind() of an IPv4 socket
 * to 0.0.0.0:PORT or 127.0.0.1:PORT (PORT != 0) is rewritten to $LOCALNODE_POD_IP:PORT, the pod's
 * own address in 127.0.0.0/8. Two pods can then both listen on 8080. Outgoing connections are not
 * touched, so a pod reaches the host's 127.0.0.1:9092 (Kafka), :5432 and :6379 as any local
 * process does. Ephemeral binds (port 0) are left alone.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind)
        real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("LOCALNODE_POD_IP");
    if (ip && addr && addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)addr;
        in_addr_t a = in->sin_addr.s_addr;
        if (in->sin_port != 0 && (a == htonl(INADDR_ANY) || a == htonl(INADDR_LOOPBACK))) {
            struct sockaddr_in copy = *in;
            if (inet_pton(AF_INET, ip, &copy.sin_addr) == 1)
                return real_bind(fd, (const struct sockaddr *)&copy, sizeof copy);
        }
    }
    return real_bind(fd, addr, len);
}
