"""keystone-manage db_sync, then bootstrap, in one interpreter (each keystone-manage run imports all of Keystone anew)."""
import sys

from keystone.cmd import cli

conf, password, url = sys.argv[1], sys.argv[2], sys.argv[3]
for args in (
    ['db_sync'],
    ['bootstrap', '--bootstrap-password', password, '--bootstrap-username', 'admin', '--bootstrap-project-name', 'admin',
     '--bootstrap-role-name', 'admin', '--bootstrap-service-name', 'keystone', '--bootstrap-region-id', 'RegionOne',
     '--bootstrap-public-url', url],
):
    cli.CONF.reset()
    cli.CONF.clear()
    try:
        cli.main(argv=['keystone-manage', '--config-file', conf, *args])
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
