"""WinCenter, the cloud management platform (HTTPS REST API, tasks, orchestration).

Not built yet: this package is reserved by the architecture and holds no code.
"""
