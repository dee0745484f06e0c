"""`attnrl analyze`: does a model show the preplan-and-anchor rhythm, and do its QK heads
know when it is right? Statistics (stats), batched capture forwards (forward), the report
(report) and the command (cli)."""
