//! The built-in RSA key of the emulated service account: a throw-away test key, never a real credential.

/// PKCS#8 PEM, the form Google puts in a service-account key file's `private_key`.
pub(crate) const SERVICE_ACCOUNT_KEY_PEM: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvwIBADANBgkqhkiG9w0BAQEFAASCBKkwggSlAgEAAoIBAQCW8ASUrZiipOHL\n\
2Dyt1IhZKUcnlZkCAqNq09KxDgiXKkqsF8nyvhmDds+iFR06Usb2gylgak6sPiXU\n\
Hmq3PRfRgnnXdO7CAt7nZFUCeH3Z5gTkSnxqpEx8AMj1biv83Sobn03gequJzEWX\n\
xFyU+tuMDJfFusJx6uZpnV6aaX/FYzgUDxmZOw1OLEuSIR7uf48SjtljL3aS8gMl\n\
6zPdBNEFMoNglG/aM0pmBRtXWqeWlqdWh28KeifCpoqt+Qcce+yqH+iscQ7Yl7FM\n\
cBq2EG1jQND1tXrQU56lg3vgrTgh7/tuT24sYdiTK7roroQU2W048tqlzdORUT8E\n\
9Inn3WhhAgMBAAECggEAGwZCa7RhPc2zt+Gxi5YgC4a+fLHmQVvjkn72nEjc9OPX\n\
ltRzjgjHXKhrKKQLJaQoh36Ya/DcwS4na8E+bix8FUD9O7xt+0K0Uk2+gsC8F8V9\n\
XrqPaDCemR0y3e6p5Y5bubJeKTENgZCXbUL1KJ95q6udiQOVSPw74PESPSdifx6s\n\
NZTre8oGlcl5MdcY5/yjAYcARyu1d/IyPOP1DowVN3og4JMp3fYN7EScfGuv6srW\n\
wh8rC+NLSrUr6ILxNRe3gxB0vrR5R3SNDrcnWqn01wqIZRLNYnApxMvRA/7Uor8h\n\
flniGGv9tcPYxiD7iWh+iR1woxbgvKGPMZGUlvIfIQKBgQDOFsp9QZjLbpAqqTWR\n\
oVa1bnX9/M6R3KnsNOtYrTQ2mhkWHpA8+kdh97WoCHlwCc2Ye+qd2Qqr/Kbbr81Y\n\
FBMhuOv0rtFJK2XEEXB21EvOrxlMWb/NUyrANjxv2fhGJpOZdTDSzRmqBYrOJwx6\n\
3Jyf9sS5jWN5XNlAyRqBw7F8hQKBgQC7fetxhaJ3om8TtCkPOC6AO0nRiO/S9eg4\n\
0ju5GQNaxCBxsXTaDiGq20CkX6zOKeT+VuIrZ6o7i1g/NbKxbpRp1vrL/ysYc5oc\n\
+2AzT3qKWTwrTJtuzbe4wfkIoHnZ57sQIJQEFjyo3UUmqLkrVTWw0Vfvml4jf6/k\n\
VZQrpdYBLQKBgQCiq9a1O9vxZ5ogMmP4SZN5rnEwRCaBd94gdjz2R/EY0FXQ4dsU\n\
ZrGFoNMgiV/hkbtZCybL5Y/I5aqHaaL6TQ405hRJlNvZl4nCU8mj4jrcL9YWMBl3\n\
ZpguFCFsYG7aYITM8nXRTtddHvbLdoMhT5XJpizuEa5dE27g9lwX5XHpSQKBgQCi\n\
j/gvMrX+UqlKhT/AgW7YIg/MDJYb7LjPY4EC6Swea8TRrxJo6i3IzVeL7aSQEIUK\n\
/VwWVEimXhhCnhV0gDNQXWSQsYq1Ja5vCImNk5DlGZ/wzvhJpzZvjEeXckSUabao\n\
sgaEUJ+BrnCBp3L9nmDyEWDUT5zl3JUuPgE9owkddQKBgQC9DVn7cuBkU3uByLXD\n\
E6JS0HkIYbqtasCK7/Fdles9Eg8mZ4tSepi1Isr7VycOv9iLFoYd7HwiuqbOeLAC\n\
Y8zz/r2DUZtZII4GJxL+8880GVJxl9JSxYPx0lok69/vMSYpYNSNqlTQ6js8ZnWG\n\
e0o6RK4Q0XN5+lYvC60O0we2sw==\n\
-----END PRIVATE KEY-----\n\
";
