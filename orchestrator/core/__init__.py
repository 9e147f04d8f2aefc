"""The contracts every room shares: the Job and its result (job), the pass cache (cache), how a job is launched
(launch), one error hierarchy (errors), atomic writes (fs). core imports no other room of orchestrator."""
