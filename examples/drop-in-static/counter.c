/*
 * A counter in memory, as a static binary on an image with nothing else in it (FROM scratch).
 *
 * One line per request on 127.0.0.1:7000: "incr" adds one; any other line only asks.
 * The answer: count=N born=T (T: when this process started, which a restore keeps and a fresh
 * start does not).
 */
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

int main(void)
{
	struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(7000),
				      .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	struct timespec now;
	long long born;
	long count = 0;
	int one = 1, server;

	clock_gettime(CLOCK_REALTIME, &now);
	born = (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
	server = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(server, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (server < 0 || bind(server, (struct sockaddr *)&address, sizeof(address)) != 0 || listen(server, 16) != 0) {
		perror("counter: cannot listen on 127.0.0.1:7000");
		return 1;
	}
	printf("counter ready\n");
	fflush(stdout);
	for (;;) {
		char request[64] = {0}, answer[96];
		int connection = accept(server, NULL, NULL);
		ssize_t length;

		if (connection < 0)
			continue;
		length = read(connection, request, sizeof(request) - 1);
		if (length > 0 && strncmp(request, "incr", 4) == 0)
			count++;
		length = snprintf(answer, sizeof(answer), "count=%ld born=%lld\n", count, born);
		if (write(connection, answer, (size_t)length) < 0)
			perror("counter: write");
		close(connection);
	}
}
