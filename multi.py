import asyncio, websockets
async def one(i):
    async with websockets.connect("ws://127.0.0.1:7272") as ws:
        return await ws.recv()
async def main():
    for i in range(8):
        print(await one(i))
asyncio.run(main())
