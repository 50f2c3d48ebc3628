"""The Ansible boundary: the only code that knows playbook names, builds the
variables a playbook gets about a store, runs ansible-runner and records runs.

The rest of the service asks for an operation by name (`operations.run`).
"""
