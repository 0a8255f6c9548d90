#!/usr/bin/env node
// An offload device written in Node.js: it plays task 0 itself (a synthetic camera frame with a
// green ball at a known place), sends each frame to the server's ExecuteRemaining at task 1, and
// prints one JSON line per answer. The schema is read from the repository's protos/ at run time.
//
//   FP=$(python -m offload.server --print-fingerprint)
//   node offload-client.js --server 127.0.0.1:50051 --fingerprint "$FP" --frames 10
'use strict';

const os = require('os');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const HEIGHT = 375; // the ball-tracking pipeline's frame: 500 wide, as its task 0 resizes to
const WIDTH = 500;

const USAGE = `usage: node offload-client.js --fingerprint FP [options]

  --server HOST:PORT     the offload server (default $OFFLOAD_SERVER or 127.0.0.1:50051)
  --pipeline NAME        the server's --pipeline (default examples.ball_tracking)
  --fingerprint FP       the pipeline's fingerprint: python -m offload.server --print-fingerprint
  --frames N             frames to send (default 10)
  --window W             frames in flight (default 4)
  --next-task K          the first task the server runs (default 1: everything after capture)
  --device-id ID         default node-<hostname>
  --token TOKEN          the server's token (default $OFFLOAD_TOKEN)
  --tls-ca PEM           use TLS, trusting this CA (--tls alone: the system's roots)
`;

function options() {
  const { values } = parseArgs({
    options: {
      server: { type: 'string', default: process.env.OFFLOAD_SERVER || '127.0.0.1:50051' },
      pipeline: { type: 'string', default: 'examples.ball_tracking' },
      fingerprint: { type: 'string', default: process.env.OFFLOAD_FINGERPRINT || '' },
      frames: { type: 'string', default: '10' },
      window: { type: 'string', default: '4' },
      'next-task': { type: 'string', default: '1' },
      'device-id': { type: 'string', default: `node-${os.hostname()}` },
      token: { type: 'string', default: process.env.OFFLOAD_TOKEN || '' },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  const ints = {};
  for (const name of ['frames', 'window', 'next-task']) {
    ints[name] = Number(values[name]);
    if (!Number.isInteger(ints[name]) || ints[name] < (name === 'frames' ? 0 : 1)) {
      fail(`--${name} ${values[name]}: give a whole number${name === 'frames' ? '' : ' >= 1'}`);
    }
  }
  if (!values.fingerprint) {
    fail('--fingerprint is required: print it with `python -m offload.server --print-fingerprint`');
  }
  return { ...values, ...ints };
}

function fail(message) {
  process.stderr.write(`error: ${message}\n${USAGE}`);
  process.exit(2);
}

// Task 0, done in JavaScript: a grey, noisy background (unsaturated, so outside the green range)
// and a green ball of radius 40 whose centre moves by (30, 10) pixels per frame. BGR, C order.
function ballCentre(item) {
  return [100 + ((30 * item) % 300), 150 + ((10 * item) % 100)];
}

function syntheticFrame(item) {
  const data = Buffer.alloc(HEIGHT * WIDTH * 3);
  let seed = (item + 1) * 2654435761;
  const [cx, cy] = ballCentre(item);
  for (let y = 0; y < HEIGHT; y++) {
    for (let x = 0; x < WIDTH; x++) {
      const i = (y * WIDTH + x) * 3;
      if ((x - cx) ** 2 + (y - cy) ** 2 <= 40 * 40) {
        data[i] = 40; // blue
        data[i + 1] = 200; // green
        data[i + 2] = 40; // red
        continue;
      }
      const grey = 90 + ((x + y) % 60);
      for (let c = 0; c < 3; c++) {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        data[i + c] = grey + ((seed >>> 16) % 12);
      }
    }
  }
  return data;
}

// offload.v1.Value -> plain JavaScript (what JSON can print).
const DTYPES = {
  b1: [1, (v, o) => v.getUint8(o) !== 0],
  u1: [1, (v, o) => v.getUint8(o)],
  i1: [1, (v, o) => v.getInt8(o)],
  u2: [2, (v, o) => v.getUint16(o, true)],
  i2: [2, (v, o) => v.getInt16(o, true)],
  u4: [4, (v, o) => v.getUint32(o, true)],
  i4: [4, (v, o) => v.getInt32(o, true)],
  u8: [8, (v, o) => Number(v.getBigUint64(o, true))],
  i8: [8, (v, o) => Number(v.getBigInt64(o, true))],
  f4: [4, (v, o) => v.getFloat32(o, true)],
  f8: [8, (v, o) => v.getFloat64(o, true)],
};

function decodeArray(array) {
  const shape = (array.shape || []).map(Number);
  const kind = DTYPES[array.dtype.slice(1)];
  if (!kind || array.dtype[0] === '>') {
    return { dtype: array.dtype, shape, base64: Buffer.from(array.data).toString('base64') };
  }
  const [size, read] = kind;
  const bytes = Buffer.from(array.data);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 0;
  const build = (dim) => {
    if (dim === shape.length) {
      const value = read(view, offset);
      offset += size;
      return value;
    }
    return Array.from({ length: shape[dim] }, () => build(dim + 1));
  };
  return build(0);
}

function decodeValue(value) {
  switch (value.kind) {
    case undefined:
    case 'none':
      return null;
    case 'int_value': {
      const n = Number(value.int_value);
      return Number.isSafeInteger(n) ? n : value.int_value;
    }
    case 'bytes_value':
      return Buffer.from(value.bytes_value).toString('base64');
    case 'array':
      return decodeArray(value.array);
    case 'list_value':
    case 'tuple_value':
      return (value[value.kind].items || []).map(decodeValue);
    case 'map_value':
      return Object.fromEntries(
        (value.map_value.entries || []).map((e) => [e.key, decodeValue(e.value || {})]),
      );
    default:
      return value[value.kind];
  }
}

function client(opts) {
  const definition = protoLoader.loadSync('offload/v1/offload.proto', {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true, // proto3 leaves zeros off the wire: item 0 must still read as 0
    oneofs: true,
  });
  const { Offload } = grpc.loadPackageDefinition(definition).offload.v1;
  let credentials = grpc.credentials.createInsecure();
  if (opts.tls || opts['tls-ca']) {
    const ca = opts['tls-ca'] ? require('fs').readFileSync(opts['tls-ca']) : null;
    credentials = grpc.credentials.createSsl(ca);
  }
  // Frames are ~560 kB; the server accepts 16 MiB by default.
  return new Offload(opts.server, credentials, {
    'grpc.max_send_message_length': 16 * 1024 * 1024,
    'grpc.max_receive_message_length': 16 * 1024 * 1024,
  });
}

function main() {
  const opts = options();
  const stub = client(opts);
  const metadata = new grpc.Metadata();
  if (opts.token) metadata.set('authorization', `Bearer ${opts.token}`);
  const runId = `node-${process.pid}-${Date.now()}`;
  const call = stub.ExecuteRemaining(metadata);
  const sentAt = new Map();
  const counts = { COMPLETED: 0, FILTERED: 0, FAILED: 0 };
  let next = 0;

  const send = () => {
    // The window bounds the frames in flight: the next one goes when an answer comes back.
    while (next < opts.frames && sentAt.size < opts.window) {
      const item = next++;
      sentAt.set(item, process.hrtime.bigint());
      call.write({
        pipeline: opts.pipeline,
        fingerprint: opts.fingerprint,
        device_id: opts['device-id'],
        run_id: runId,
        item,
        next_task: opts['next-task'],
        args: { array: { dtype: '|u1', shape: [HEIGHT, WIDTH, 3], data: syntheticFrame(item) } },
        capture_time: Date.now() / 1000,
      });
    }
    if (next >= opts.frames && sentAt.size === 0) call.end();
  };

  call.on('data', (answer) => {
    const item = Number(answer.item);
    const began = sentAt.get(item);
    sentAt.delete(item);
    counts[answer.status] = (counts[answer.status] || 0) + 1;
    const line = {
      item,
      status: answer.status.toLowerCase(),
      drawn_centre: ballCentre(item),
      latency_ms: began === undefined ? null : Number(process.hrtime.bigint() - began) / 1e6,
      server_cpu_ms: answer.server_cpu_seconds * 1000,
    };
    if (answer.status === 'COMPLETED') line.result = decodeValue(answer.output || {});
    else line.task = answer.task;
    if (answer.error) line.error = answer.error;
    process.stdout.write(`${JSON.stringify(line)}\n`);
    send();
  });
  call.on('error', (err) => {
    process.stderr.write(`error: server answered ${grpc.status[err.code]}: ${err.details}\n`);
    process.exitCode = 1;
  });
  call.on('end', () => {
    process.stderr.write(
      `offload (node): ${opts.frames} frames to ${opts.server}: ${counts.COMPLETED} completed, ` +
        `${counts.FILTERED} filtered, ${counts.FAILED} failed\n`,
    );
    stub.close();
  });
  send();
}

main();
