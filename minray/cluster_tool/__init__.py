"""`minray-cluster`: bring a cluster of machines up and down, run commands on
them, copy files to them and upgrade minray on them, over SSH (paramiko).

    workers_file.py   the hosts of workers.txt
    ssh.py            one SSH connection: host keys, commands, SFTP
    remote.py         what runs on a host: the probe, starting and stopping nodes
    commands.py       up, down, status, exec, sync, upgrade over all hosts
    cli.py            the command line
"""
