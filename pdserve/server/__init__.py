"""HTTP serving: front process (FastAPI), DP controller and one worker process per DP rank.

Flow of one request::

    client --HTTP--> front: api_native / api_openai parse and check the body, tokenize
        -> generation.GenerationService: validate against the limits workers reported,
           dispatch.* picks a rank (unless pinned), controller.DPController.submit
        --ZMQ PUSH (messages.GenerateReq)--> worker.Worker (one process per rank): EngineCore.step()
        <--ZMQ PULL (messages.OutputBatch: StepOutputs + rank load)-- per engine step
        -> controller routes each StepOutput to its request's asyncio queue
        -> generation.Generation detokenizes, trims stops, accumulates logprobs
        -> the API module formats JSON or SSE chunks.

Modules: messages (the one wire format), worker, controller, dispatch, generation, api_common,
api_native, api_openai, metrics, state, app (factory + lifespan), config and cli (flags).
"""
