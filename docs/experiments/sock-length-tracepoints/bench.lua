wrk.method = "POST"
wrk.body = "hello"
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  io.write(string.format('RES %d %d %d\n', summary.requests, summary.duration, latency:percentile(99)))
end
