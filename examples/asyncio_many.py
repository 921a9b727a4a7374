"""Thousands of tasks from asyncio: await zmqexec futures like any other awaitable.

A ``zmqexec.Future`` can be awaited directly, wrapped with ``asyncio.wrap_future``, or
made by ``loop.run_in_executor(executor, fn, ...)``; ``asyncio.gather`` runs thousands of
them concurrently while the event loop stays free for other work (here a ticker).

Run it from the repository root::

    python examples/asyncio_many.py
"""
import asyncio
import time

from zmqexec import ZMQExecutor


def collatz_steps(n):
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


async def ticker(stop):
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(0.01)
        ticks += 1
    return ticks


async def main():
    loop = asyncio.get_running_loop()
    with ZMQExecutor(max_workers=2) as ex:
        stop = asyncio.Event()
        ticks = asyncio.create_task(ticker(stop))
        t0 = time.perf_counter()
        steps = await asyncio.gather(*(ex.submit(collatz_steps, n) for n in range(1, 5001)))
        elapsed = time.perf_counter() - t0
        stop.set()
        longest = max(range(len(steps)), key=steps.__getitem__) + 1
        print(f"5000 tasks awaited in {elapsed:.2f} s; longest chain: {longest} "
              f"({steps[longest - 1]} steps)")
        print(f"the event loop ticked {await ticks} times meanwhile")
        one = await asyncio.wrap_future(ex.submit(collatz_steps, 27))
        two = await loop.run_in_executor(ex, collatz_steps, 97)
        print(f"wrap_future: 27 takes {one} steps; run_in_executor: 97 takes {two} steps")


if __name__ == "__main__":
    asyncio.run(main())
