import time, redis, pytest
from tests.servers import S3Server, RedisServer
from posebatch.storage import open_storage
from posebatch.errors import StorageError

def test_redis_restart(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    assert r.ping()
    port = redis_server.port
    t = time.time(); redis_server.stop(); print("\nredis stop", time.time() - t)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_server.url, socket_connect_timeout=1).ping()
    t = time.time(); redis_server.start(); print("redis start", time.time() - t)
    assert redis_server.port == port and redis.Redis.from_url(redis_server.url).ping()

def test_s3_restart_keeps_data(s3_server, bucket):
    st = open_storage(f"s3://{bucket}")
    st.write("k.json", b"v")
    t = time.time(); s3_server.stop(); print("\nweed stop", time.time() - t)
    with pytest.raises(StorageError):
        open_storage(f"s3://{bucket}", s3_client=None).read("k.json")
    t = time.time(); s3_server.start(); print("weed start", time.time() - t)
    assert open_storage(f"s3://{bucket}").read("k.json") == b"v"
    t = time.time(); s3_server.kill(); s3_server.start(); print("weed kill+start", time.time() - t)
    assert open_storage(f"s3://{bucket}").read("k.json") == b"v"

def test_startup_failure_shows_log(tmp_path):
    class Bad(RedisServer):
        def command(self):
            return [self.binary, "--port", "notaport"]
    b = Bad(tmp_path, "/usr/bin/redis-server")
    with pytest.raises(RuntimeError) as e:
        b.start()
    print("\n", str(e.value)[:600])
    assert "exited during startup" in str(e.value)

def test_env(s3_server):
    print(s3_server.env(), s3_server.endpoint, s3_server.ports)
