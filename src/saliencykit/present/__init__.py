"""What a person reads and sees: pictures (`viz`), words (`verbalize`), the HTML report (`report`)
and the web app (`app`). Nothing below this room imports it."""
