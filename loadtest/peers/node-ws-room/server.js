// Reference peer for the fan-out benchmark: a plain Node.js broadcast room on the `ws`
// package. Any text a client sends is sent, unchanged, to every connected client (the
// sender included). No auth, no protocol, no welcome frame: the bare cost of a broadcast.
// Usage: node server.js [PORT] [HOST]   (default 127.0.0.1:18182)
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 18182);
const host = process.argv[3] || '127.0.0.1';
const wss = new WebSocketServer({ port, host, perMessageDeflate: false });

wss.on('connection', (socket) => {
  socket.on('error', () => {});
  socket.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => console.log(`node-ws-room listening on ws://${host}:${port}/`));
