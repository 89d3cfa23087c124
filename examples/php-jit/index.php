<?php
// A counter kept in APCu's shared memory (nothing on disk): after a migration
// it goes on only if the server's memory came along.
header('Content-Type: text/plain');
$path = parse_url($_SERVER['REQUEST_URI'], PHP_URL_PATH);
apcu_add('started', gmdate('Y-m-d\TH:i:s') . sprintf('.%06dZ', (int) (microtime(true) * 1e6) % 1000000));
apcu_add('count', 0);
if ($path === '/health') {
    echo "ok\n";
} elseif ($path === '/count') {
    echo ($_SERVER['REQUEST_METHOD'] === 'POST' ? apcu_inc('count') : apcu_fetch('count')), "\n";
} elseif ($path === '/stats') {
    $jit = function_exists('opcache_get_status') ? (opcache_get_status(false)['jit'] ?? []) : [];
    echo json_encode([
        'pid' => getmypid(), 'started' => apcu_fetch('started'), 'php' => PHP_VERSION,
        'jit_enabled' => (bool) ($jit['enabled'] ?? false), 'jit_buffer_size' => (int) ($jit['buffer_size'] ?? 0),
    ]), "\n";
} else {
    http_response_code(404);
    echo "not found\n";
}
